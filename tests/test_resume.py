"""Resuming `distillens fit` continues at the exact step, with optimizer, schedule and data position restored.

The proof is the logged curves: from the step it resumes at, a resumed run must log the train/loss and learning
rate of an uninterrupted run with the same config, step for step. Training batches are shuffled and the tiny data
has five of them per epoch, so a wrong data position, a fresh optimizer or a restarted schedule all change the
losses. Resumes happen from a checkpoint path (mid-epoch) and with `--ckpt_path last` after `kill -9` of a real
`distillens fit` process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import checkpoint_every_step, tiny_fit_config, write_config
from reference import (
    Objective,
    checkpoint_student,
    probe_models,
    probe_steps,
    relative_difference,
    train_reference,
    warmup_cosine_lr,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distillens.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "instructions"
DISTILLENS = Path(sys.executable).with_name("distillens")
MAX_STEPS = 8  # the tiny data makes 5 batches per epoch: the run crosses an epoch boundary
CURVES = ("train/loss", "lr-AdamW/decay")  # LearningRateMonitor names each parameter group by its "name"
KILL_AFTER_STEP = 3
REPLAYED_STEPS = 3  # steps of the uninterrupted run recomputed independently


def resume_config(folder: Path, cache_dir: Path, probe: Path | None = None) -> Path:
    """configs/tiny.yaml for MAX_STEPS steps, checkpointing (and keeping) every step, outputs under folder;
    ``probe``: record the run's initial weights and batches there (tests/probes.py)."""
    config = tiny_fit_config(folder, cache_dir, max_steps=MAX_STEPS)
    trainer = config["trainer"]
    kept = [c for c in trainer["callbacks"] if c["class_path"].endswith("LearningRateMonitor")]
    trainer["callbacks"] = [checkpoint_every_step(save_last=True), *kept]
    if probe is not None:
        trainer["callbacks"].append({"class_path": "probes.RecordRun", "init_args": {"folder": str(probe)}})
    return write_config(config, folder / "resume.yaml")


def fit(config: Path, *extra: str):
    with mock.patch.object(sys, "argv", ["distillens"]):  # pytest's own arguments are not the CLI's
        return run_cli(["fit", "--config", str(config), *extra])


def curves(event_files: list[Path]) -> dict[str, dict[int, float]]:
    """Each curve of CURVES as {step: value}, read from TensorBoard event files."""
    found: dict[str, dict[int, float]] = {name: {} for name in CURVES}
    for path in event_files:
        events = EventAccumulator(str(path))
        events.Reload()
        for name in CURVES:
            found[name].update({event.step: event.value for event in events.Scalars(name)})
    return found


def event_files(run: Path) -> set[Path]:
    return set(run.glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    """The reference: MAX_STEPS steps in one go. Returns (its run folder, its curves, batches per epoch)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    cli = fit(resume_config(folder, cache_dir, probe=folder / "probe"))
    assert cli.trainer.global_step == MAX_STEPS
    run = folder / "tiny"
    return run, curves(sorted(event_files(run))), cli.trainer.num_training_batches


def test_uninterrupted_run_equals_plain_pytorch(uninterrupted):
    """The reference of the resume tests pinned to an independent value: its first steps are AdamW (configs/
    tiny.yaml: lr 1e-3, 2 warm-up steps, cosine to 0.1 at MAX_STEPS, weight decay 0.01) on the gradient of the
    token mean of the paper's objective, written in tests/reference.py."""
    run, _, _ = uninterrupted
    probe = run.parent / "probe"
    student, teacher, start = probe_models(probe)
    lrs = [warmup_cosine_lr(k, 1e-3, 2, MAX_STEPS, 0.1) for k in range(REPLAYED_STEPS)]
    objective = Objective(student_layers=[1], teacher_layers=[2])
    steps = probe_steps(probe, REPLAYED_STEPS)
    reference = train_reference(student, teacher, steps, objective, lrs, weight_decay=0.01)
    for step in range(1, REPLAYED_STEPS + 1):
        saved = checkpoint_student(run / "checkpoints" / f"step{step}.ckpt")
        difference = relative_difference(saved, reference[step - 1].weights, start)
        assert difference < 1e-3, (
            f"weights after step {step} off the reference by {difference:.3g} of the update"
        )


def assert_continues(
    resumed: dict[str, dict[int, float]], reference: dict[str, dict[int, float]], start: int
):
    """The resumed curves cover exactly steps start..MAX_STEPS-1 and equal the reference there."""
    for name in CURVES:
        assert sorted(resumed[name]) == list(range(start, MAX_STEPS)), (
            f"{name} logged at {sorted(resumed[name])}"
        )
        for step, value in resumed[name].items():
            assert value == pytest.approx(reference[name][step], rel=1e-6, abs=0), f"{name} at step {step}"


def test_checkpoints_record_the_data_position(uninterrupted):
    """Step s ends batch (s-1) % n + 1 of epoch (s-1) // n, n batches per epoch."""
    run, _, per_epoch = uninterrupted
    for step in range(1, MAX_STEPS + 1):
        checkpoint = torch.load(run / "checkpoints" / f"step{step}.ckpt", weights_only=True)
        expected = {"epoch": (step - 1) // per_epoch, "batches": (step - 1) % per_epoch + 1}
        assert checkpoint["InstructionDataModule"]["train_position"] == expected, f"step {step}"


@pytest.mark.parametrize("step", [3, 5], ids=["mid-epoch", "end-of-epoch"])  # 5 batches per epoch
def test_resume_from_a_checkpoint_path_continues_the_curves(step, uninterrupted, tmp_path, cache_dir):
    run, reference, _ = uninterrupted
    cli = fit(
        resume_config(tmp_path, cache_dir), "--ckpt_path", str(run / "checkpoints" / f"step{step}.ckpt")
    )
    assert cli.trainer.global_step == MAX_STEPS
    assert_continues(curves(sorted(event_files(tmp_path / "tiny"))), reference, start=step)


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"distillens fit ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{path} not written within {timeout_s} s"
        time.sleep(0.2)


def test_resume_after_kill_9_continues_the_curves(uninterrupted, tmp_path, cache_dir):
    _, reference, _ = uninterrupted
    config = resume_config(tmp_path, cache_dir)
    checkpoints = tmp_path / "tiny" / "checkpoints"
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [DISTILLENS, "fit", "--config", str(config)],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )
    try:
        wait_for(checkpoints / f"step{KILL_AFTER_STEP}.ckpt", process, log, timeout_s=240)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone if it failed
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # last.ckpt is written after step{s}.ckpt, so the kill may come before it holds step KILL_AFTER_STEP
    killed_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < MAX_STEPS, "the run must be killed in the middle"

    before = event_files(tmp_path / "tiny")
    cli = fit(config, "--ckpt_path", "last")
    assert cli.trainer.global_step == MAX_STEPS
    resumed = curves(sorted(event_files(tmp_path / "tiny") - before))
    assert_continues(resumed, reference, start=killed_at)
