"""Resuming from a checkpoint: one rule for ``--ckpt_path FILE`` and ``--ckpt_path last``.

What the user writes (config files and command line) is what runs. A checkpoint brings back the student's weights
and, in ``fit``, the optimizer, schedule and loop state; it never brings back settings. Settings that only steer
training or evaluation (loss weights, divergences, layer pairs, the schedule, generation) may change on resume, and
the run says in one line which ones did. Settings that decide which weights the checkpoint holds (the student's
architecture and source, the teacher, the MSE projections) may not: the checkpoint could not be loaded into the
models the config builds, so that is one error line naming the differing fields. How the models run may change
(activation checkpointing, the LoRA dropout).

``last`` keeps Lightning's meaning (the newest ``last*.ckpt`` in the run's checkpoint folder), so a preempted job
relaunched with the same command resumes; when there is none, ``fit`` says where it looked and starts fresh, while
``validate`` and ``test`` stop, having nothing to evaluate.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distillens.checkpoints import LIGHTNING_CKPT_NAMES, load_checkpoint

log = logging.getLogger(__name__)

FIXED = ("student", "teacher")
"""Hyper-parameter groups that decide the weights a checkpoint holds: they cannot change on resume."""
EXECUTION = ("gradient_checkpointing", "lora.dropout")
"""Fields of those groups that only say how the models run, not what they compute from their weights: a run out
of memory may resume with activation checkpointing on."""


def flatten(settings: Mapping[str, Any], prefix: str = "model") -> dict[str, Any]:
    """Nested hyper-parameters as dotted option names: {"loss": {"kd_weight": 1}} -> {"model.loss.kd_weight": 1}."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}.{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_settings(saved: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Option name -> (value in the checkpoint, value now) for every setting that differs."""
    before, after = flatten(saved), flatten(given)
    return {
        name: (before.get(name), after.get(name))
        for name in sorted(before.keys() | after.keys())
        if before.get(name) != after.get(name)
    }


def fixed_changes(changes: Mapping[str, tuple[Any, Any]], saved: Mapping, given: Mapping) -> list[str]:
    """The changed options that the checkpoint's weights depend on."""
    fixed = [
        name for name in changes if name.split(".")[1] in FIXED and name.split(".", 2)[2] not in EXECUTION
    ]
    uses_projections = any((settings.get("loss") or {}).get("mse_weight") for settings in (saved, given))
    if uses_projections:  # one teacher -> student projection per layer pair is part of the weights
        fixed += [
            name for name in changes if name.startswith("model.layers.") or name == "model.loss.mse_weight"
        ]
    return fixed


SHOWN_CHANGES = 3
"""How many refused changes the error line spells out; the rest are counted."""
SHOWN_VALUE = 40
"""Characters of a value the error line shows (a whole model config would make it a page)."""


def check_resumable(
    path: Path, saved: Mapping[str, Any], given: Mapping[str, Any], stage: str = "fit"
) -> dict[str, tuple]:
    """Raise one short line when the checkpoint cannot be loaded into the configured models; else return the
    changes. ``stage``: fit resumes the run; validate and test evaluate its checkpoint."""
    changes = changed_settings(saved, given)
    fixed = sorted(
        fixed_changes(changes, saved, given), key=lambda name: (name.count("."), name)
    )  # source first
    if fixed:
        differences = "; ".join(
            f"{name}: {shortened(changes[name][0])} there, {shortened(changes[name][1])} here"
            for name in fixed[:SHOWN_CHANGES]
        )
        more = f"; and {len(fixed) - SHOWN_CHANGES} more" if len(fixed) > SHOWN_CHANGES else ""
        remedy = (
            "resume with the run's own model settings, or start a new run without --ckpt_path"
            if stage == "fit"
            else f"{stage} it with the model settings of the run that saved it (the config it was trained with)"
        )
        raise ValueError(
            f"{path}: was trained with other models than this config builds ({differences}{more}); {remedy}"
        )
    return changes


def shortened(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_VALUE else text[: SHOWN_VALUE - 3] + "..."


def describe_changes(path: Path, changes: Mapping[str, tuple[Any, Any]], stage: str = "fit") -> str:
    """One line: which settings differ from the checkpoint's, which now apply."""
    listed = ", ".join(f"{name} {before!r} -> {after!r}" for name, (before, after) in changes.items())
    doing = "resuming from" if stage == "fit" else f"{stage.removesuffix('e')}ing"
    return f"{doing} {path} with changed settings: {listed}"


def saved_hyper_parameters(path: Path) -> dict[str, Any]:
    """The module hyper-parameters a checkpoint recorded (memory-mapped: the weights are not read)."""
    return dict(load_checkpoint(path, mmap=True).get("hyper_parameters") or {})


def checkpoint_folders(trainer) -> list[Path]:
    """Where the trainer's ModelCheckpoint callbacks write (resolved as Lightning does, before or after setup)."""
    return [Path(cb._ModelCheckpoint__resolve_ckpt_dir(trainer)) for cb in _model_checkpoints(trainer)]


def last_checkpoint(trainer) -> Path | None:
    """The newest ``last*.ckpt`` of the trainer's checkpoint callbacks: what Lightning's ``last`` means."""
    found = [Path(p) for cb in _model_checkpoints(trainer) for p in cb._find_last_checkpoints(trainer)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def best_checkpoint(trainer, stage: str) -> Path:
    """What ``--ckpt_path best`` means in a new process: the best checkpoint the run's newest state records.

    Lightning knows the best checkpoint only within the fit that saved it (a fresh ``validate`` has none); the
    ModelCheckpoint state in the newest ``last*.ckpt`` names it. A run folder that was moved still has the file
    under its old name beside ``last.ckpt``.
    """
    if stage == "fit":
        raise ValueError(
            "--ckpt_path best: fit goes on from the newest state (--ckpt_path last) or a file; best is for "
            "validate and test"
        )
    newest = last_checkpoint(trainer)
    if newest is None:
        where = (
            ", ".join(str(folder) for folder in checkpoint_folders(trainer))
            or "(no ModelCheckpoint callback)"
        )
        raise ValueError(
            f"--ckpt_path best: no last*.ckpt in {where} records a best checkpoint; nothing to {stage}"
        )
    states = (load_checkpoint(newest, mmap=True).get("callbacks") or {}).values()
    named = [Path(state["best_model_path"]) for state in states if state.get("best_model_path")]
    if not named:
        raise ValueError(
            f"--ckpt_path best: {newest} records no best checkpoint (its ModelCheckpoint monitors nothing); "
            "name a checkpoint file"
        )
    for path in (named[0], newest.parent / named[0].name):
        if path.is_file():
            log.info("--ckpt_path best: %s", path)
            return path
    raise FileNotFoundError(f"--ckpt_path best: {newest} names {named[0]}, which is gone")


def adopt_last_checkpoints(trainer) -> None:
    """Make the ``last.ckpt`` already in each ModelCheckpoint's folder the one that callback replaces next.

    Lightning takes a ``last.ckpt`` it did not write itself (one saved on Ctrl-C before the callback's first save,
    or any after the run folder was copied or moved, when the callback's restored state is dropped) for another
    run's, and saves ``last-v1.ckpt`` beside it from then on: ``last.ckpt``, the file the README exports, would
    stay at the step the run resumed from. A fresh fit refuses a folder with checkpoints (runs.py), so a
    ``last.ckpt`` there is this run's.
    """
    for callback in _model_checkpoints(trainer):
        last = _last_file(callback)
        if callback.save_last and last is not None and os.path.lexists(last):
            callback.last_model_path = last


def save_as_last(trainer, path: Path) -> None:
    """Save the trainer's state to ``path`` as its ModelCheckpoint's ``last`` file, outside the callbacks' own
    schedule; none of them saves again at this step (at a validation or the epoch's end) over it."""
    for callback in _model_checkpoints(trainer):
        if callback.save_last and _last_file(callback) == str(path):
            callback.last_model_path = str(path)  # part of the state the checkpoint records
        callback._last_global_step_saved = trainer.global_step  # what the callback's own saves set
    trainer.save_checkpoint(path)


def last_checkpoint_lags(trainer, path: Path) -> bool:
    """Whether the ModelCheckpoint keeping its ``last`` file at ``path`` last saved before this step (it saves
    ``last`` together with any other file, so no save at this step means no ``last`` either)."""
    return any(
        callback.save_last
        and _last_file(callback) == str(path)
        and callback._last_global_step_saved < trainer.global_step
        for callback in _model_checkpoints(trainer)
    )


def _last_file(callback) -> str | None:
    """Where a ModelCheckpoint (set up) writes its ``last`` file, as Lightning spells it; None before setup."""
    if callback.dirpath is None:
        return None
    return callback.format_checkpoint_name({}, callback.CHECKPOINT_NAME_LAST)


def _model_checkpoints(trainer) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]


def resolve_checkpoint(trainer, ckpt_path: str | None, given: Mapping[str, Any], stage: str) -> str | None:
    """The checkpoint a launch starts from, checked against the configured models; None to start fresh."""
    if ckpt_path == "last":
        found = last_checkpoint(trainer)
        if found is None:
            folders = checkpoint_folders(trainer)
            where = ", ".join(str(folder) for folder in folders) or "(no ModelCheckpoint callback configured)"
            if stage != "fit":
                raise ValueError(f"--ckpt_path last: no last*.ckpt in {where}; nothing to {stage}")
            log.info("--ckpt_path last: no last*.ckpt in %s yet; training starts from step 0", where)
            return None
        ckpt_path = str(found)
    elif ckpt_path == "best":
        ckpt_path = str(best_checkpoint(trainer, stage))
    elif ckpt_path is None or ckpt_path in LIGHTNING_CKPT_NAMES or ckpt_path.startswith("registry:"):
        return ckpt_path  # Lightning's to resolve
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    changes = check_resumable(path, saved_hyper_parameters(path), given, stage)
    if changes:
        log.info(describe_changes(path, changes, stage))
    return str(path)
