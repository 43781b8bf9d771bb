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
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from helpers import (
    DISTILLENS,
    REPO,
    checkpoint_every_step,
    scalars,
    subprocess_env,
    tiny_fit_config,
    write_config,
)
from reference import (
    Objective,
    checkpoint_student,
    probe_models,
    probe_steps,
    relative_difference,
    tiny_llama,
    train_reference,
    warmup_cosine_lr,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from distillens.cli import main
from distillens.lightning_cli import run_cli
from distillens.models import ModelSpec
from distillens.resume import changed_settings, check_resumable

DATA = REPO / "data" / "instructions"
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
    resumed: dict[str, dict[int, float]],
    reference: dict[str, dict[int, float]],
    start: int,
    rel: float = 1e-6,
):
    """The resumed curves cover exactly steps start..MAX_STEPS-1 and equal the reference there (to ``rel``: a
    cached teacher's last-digit differences, from another batch shape at its build, grow through Adam's steps)."""
    for name in CURVES:
        assert sorted(resumed[name]) == list(range(start, MAX_STEPS)), (
            f"{name} logged at {sorted(resumed[name])}"
        )
        for step, value in resumed[name].items():
            assert value == pytest.approx(reference[name][step], rel=rel, abs=0), f"{name} at step {step}"


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


@pytest.mark.parametrize("targets", ["live", "hidden"])
def test_resume_after_kill_9_continues_the_curves(targets, uninterrupted, tmp_path, cache_dir):
    """Also with cached hidden-state targets (teacher_cache.py): the killed run builds its cache, the resumed one
    reads it, and both log the live run's curves."""
    _, reference, _ = uninterrupted
    config = resume_config(tmp_path, cache_dir)
    options = [
        "--model.teacher_targets.kind",
        targets,
        "--model.teacher_targets.cache_dir",
        str(tmp_path / "teacher"),
    ]
    checkpoints = tmp_path / "tiny" / "checkpoints"
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [DISTILLENS, "fit", "--config", str(config), *options],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
            env=subprocess_env(),
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
    cli = fit(config, "--ckpt_path", "last", *options)
    assert cli.trainer.global_step == MAX_STEPS
    resumed = curves(sorted(event_files(tmp_path / "tiny") - before))
    assert_continues(resumed, reference, start=killed_at, rel=1e-6 if targets == "live" else 1e-5)
    assert (targets == "hidden") == (cli.model.teacher_cache is not None)


# ------------------------------------------------------------------------ what a resume may change (issue 10, 1 and 5)


def resumed_from(step: int, uninterrupted, folder: Path, cache_dir: Path, *changes: str):
    """fit resumed from the uninterrupted run's step-``step`` checkpoint with ``changes`` on the command line."""
    run, _, _ = uninterrupted
    return fit(
        resume_config(folder, cache_dir),
        "--ckpt_path",
        str(run / "checkpoints" / f"step{step}.ckpt"),
        *changes,
    )


def test_a_resume_trains_with_the_changed_loss_weight_and_records_it(
    uninterrupted, tmp_path, cache_dir, caplog
):
    """The command line wins over the checkpoint's hyper-parameters, and config.yaml and hparams.yaml say so."""
    with caplog.at_level("INFO", logger="distillens.resume"):
        cli = resumed_from(3, uninterrupted, tmp_path, cache_dir, "--model.loss.kd_weight", "0.25")
    assert cli.model.loss_config.kd_weight == 0.25
    run = tmp_path / "tiny"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["loss"]["kd_weight"] == 0.25
    assert yaml.safe_load((run / "hparams.yaml").read_text())["loss"]["kd_weight"] == 0.25
    (line,) = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert line.endswith("with changed settings: model.loss.kd_weight 1.0 -> 0.25")


def test_a_resume_follows_the_changed_schedule_from_the_restored_step(uninterrupted, tmp_path, cache_dir):
    """A new peak learning rate applies from the resumed step on, where the restored optimizer had the old one."""
    fit_ = resumed_from(3, uninterrupted, tmp_path, cache_dir, "--model.optimizer.lr", "5e-4")
    assert fit_.trainer.global_step == MAX_STEPS
    logged = curves(sorted(event_files(tmp_path / "tiny")))["lr-AdamW/decay"]
    expected = {step: warmup_cosine_lr(step, 5e-4, 2, MAX_STEPS, 0.1) for step in range(3, MAX_STEPS)}
    assert logged == pytest.approx(expected, rel=1e-6)


def test_a_resume_may_turn_on_gradient_checkpointing(uninterrupted, tmp_path, cache_dir, caplog):
    """Checkpointing activations is how to resume a run that ran out of memory: the weights are the same, and
    so is every value computed from them."""
    _, reference, _ = uninterrupted
    with caplog.at_level("INFO", logger="distillens.resume"):
        cli = resumed_from(
            7, uninterrupted, tmp_path, cache_dir, "--model.student.gradient_checkpointing", "true"
        )
    assert cli.model.student.is_activation_checkpointing and cli.trainer.global_step == MAX_STEPS
    assert "model.student.gradient_checkpointing False -> True" in caplog.text
    assert_continues(curves(sorted(event_files(tmp_path / "tiny"))), reference, start=7)


def test_only_settings_that_decide_the_weights_block_a_resume():
    """The execution settings of either model (activation checkpointing, the LoRA dropout) may change; its source,
    architecture and LoRA shape may not."""
    from distillens.resume import check_resumable

    saved = {
        "student": {
            "config": {"hidden_size": 32},
            "gradient_checkpointing": False,
            "lora": {"r": 8, "dropout": 0.1},
        },
        "teacher": {"source": "teacher", "gradient_checkpointing": False},
    }
    execution = {
        "student": dict(saved["student"], gradient_checkpointing=True, lora={"r": 8, "dropout": 0.0}),
        "teacher": dict(saved["teacher"], gradient_checkpointing=True),
    }
    assert set(check_resumable(Path("run.ckpt"), saved, execution)) == {
        "model.student.gradient_checkpointing", "model.student.lora.dropout", "model.teacher.gradient_checkpointing",
    }  # fmt: skip
    for field, value in (("lora", {"r": 4, "dropout": 0.1}), ("config", {"hidden_size": 64})):
        with pytest.raises(ValueError, match=f"model.student.{field}"):
            check_resumable(
                Path("run.ckpt"), saved, dict(saved, student=dict(saved["student"], **{field: value}))
            )


@pytest.mark.parametrize("form", ["file", "last"])
def test_a_resume_into_another_student_is_one_line_naming_the_field(
    form, uninterrupted, tmp_path, cache_dir, capsys
):
    run, _, _ = uninterrupted
    if form == "last":  # the run's own folder, found by --ckpt_path last
        config, ckpt_path = resume_config(run.parent, cache_dir), "last"
    else:
        config, ckpt_path = resume_config(tmp_path, cache_dir), str(run / "checkpoints" / "step3.ckpt")
    with pytest.raises(SystemExit) as exit_, mock.patch.object(sys, "argv", ["distillens"]):
        main(
            [
                "fit",
                "--config",
                str(config),
                "--ckpt_path",
                ckpt_path,
                "--model.student.config.hidden_size",
                "64",
            ]
        )
    assert exit_.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "model.student.config.hidden_size: 32 there, 64 here" in line
    assert line.startswith("distillens: error: ") and ".ckpt: was trained with other models" in line


def model_settings(teacher: dict) -> dict:
    """A run's module hyper-parameters as a checkpoint records them (dataclasses as dicts), with ``teacher``."""
    student, teacher = ModelSpec(**tiny_llama(2, 32)), ModelSpec(**teacher)
    return {"student": asdict(student), "teacher": asdict(teacher), "loss": {"kd_weight": 1.0}}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"config": tiny_llama(4, 64)["config"]}, "model.teacher.config.hidden_size: 48 there, 64 here"),
        ({"config": None, "source": "models/other-teacher"}, "model.teacher.source: None there"),
        ({"adapter": "adapters/dolly"}, "model.teacher.adapter: None there, 'adapters/dolly' here"),
    ],
)
def test_a_resume_with_another_teacher_is_refused_naming_the_field(change, named):
    """The checkpoint's student was distilled from its teacher: another one (architecture, source, adapter) is
    another run, refused like another student; a loss weight alone may change."""
    saved = model_settings(tiny_llama(4, 48))
    given = model_settings({**tiny_llama(4, 48), **change})
    with pytest.raises(ValueError, match="was trained with other models") as refused:
        check_resumable(Path("run/last.ckpt"), saved, given)
    assert named in str(refused.value)
    loss_only = {**saved, "loss": {"kd_weight": 0.5}}
    assert check_resumable(Path("run/last.ckpt"), saved, loss_only) == {"model.loss.kd_weight": (1.0, 0.5)}


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluating_a_checkpoint_of_other_models_is_one_short_line_for_that_stage(stage):
    """Another student whose whole config differs: three changes spelt out, the rest counted, long values cut; the
    remedy is the stage's, not a resume's."""
    saved = model_settings(tiny_llama(4, 48))
    other = ModelSpec(
        config={"model_type": "gpt2", "vocab_size": 49152, "n_embd": 64, "n_layer": 3, "n_head": 4},
        tokenizer="a-tokenizer-folder-with-a-rather-long-name-indeed",
    )
    given = {**saved, "student": asdict(other)}
    with pytest.raises(ValueError) as refused:
        check_resumable(Path("run/last.ckpt"), saved, given, stage)
    line = str(refused.value)
    changed = len(changed_settings(saved, given))
    assert "\n" not in line and len(line) < 500, line
    assert f"; and {changed - 3} more);" in line and "resume" not in line
    assert line.endswith(
        f"{stage} it with the model settings of the run that saved it (the config it was trained with)"
    )
    assert "'a-tokenizer-folder-with-a-rather-lon..." in line or line.count("...") >= 1


def test_ckpt_path_last_without_a_checkpoint_says_where_it_looked_and_starts_fresh(
    tmp_path, cache_dir, capsys
):
    config = resume_config(tmp_path, cache_dir)
    with mock.patch.object(sys, "argv", ["distillens"]):
        main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "1"])
    captured = capsys.readouterr()
    folder = tmp_path / "tiny" / "checkpoints"
    assert f"--ckpt_path last: no last*.ckpt in {folder} yet; training starts from step 0" in captured.out
    assert (
        "no last checkpoint available" not in captured.err
    )  # Lightning's own warning, replaced by that line


def test_testing_ckpt_path_last_without_a_checkpoint_is_one_error_line(tmp_path, cache_dir, capsys):
    config = resume_config(tmp_path, cache_dir)
    with pytest.raises(SystemExit), mock.patch.object(sys, "argv", ["distillens"]):
        main(["validate", "--config", str(config), "--ckpt_path", "last"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("distillens: error: --ckpt_path last: no last*.ckpt in ")
        and "nothing to validate" in line
    )


def test_ctrl_c_saves_a_checkpoint_that_resumes_where_it_stopped(uninterrupted, tmp_path, cache_dir, capsys):
    """SIGINT (Ctrl-C) before step 3's batch: the step finishes, last.ckpt holds step 4, fit exits with 130 and one
    line says how to go on, and the resumed run logs the uninterrupted run's curves from step 4 on."""
    _, reference, _ = uninterrupted
    config = yaml.safe_load(resume_config(tmp_path, cache_dir).read_text())
    config["trainer"]["callbacks"].append({"class_path": "probes.StopAt", "init_args": {"step": 3}})
    interrupted = write_config(config, tmp_path / "interrupted.yaml")
    with pytest.raises(SystemExit) as exit_, mock.patch.object(sys, "argv", ["distillens"]):
        main(["fit", "--config", str(interrupted)])
    assert exit_.value.code == 130
    last = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    assert f"interrupted at step 4: saved {last}; to go on, run the same command with --ckpt_path last" in (
        capsys.readouterr().out
    )
    assert torch.load(last, weights_only=True)["global_step"] == 4
    before = event_files(tmp_path / "tiny")
    cli = fit(resume_config(tmp_path, cache_dir), "--ckpt_path", "last")
    assert cli.trainer.global_step == MAX_STEPS
    assert_continues(curves(sorted(event_files(tmp_path / "tiny") - before)), reference, start=4)


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_the_progress_bar_counts_steps_of_the_planned_total_across_a_resume(
    bar, uninterrupted, tmp_path, cache_dir
):
    """Resumed at step 3 of 8, in the middle of the first epoch (5 batches): the bar ends at 8 of 8 steps, where
    Lightning's read 'Epoch 1/-2' and counted the epoch's batches."""
    extra = ["--trainer.enable_progress_bar", "true"]
    if bar == "tqdm":  # what Lightning uses when rich is not installed
        extra += ["--trainer.callbacks+", "lightning.pytorch.callbacks.TQDMProgressBar"]
    cli = resumed_from(3, uninterrupted, tmp_path, cache_dir, *extra)
    progress = cli.trainer.progress_bar_callback
    if bar == "rich":
        task = progress.progress.tasks[progress.train_progress_bar_id]
        total, done, title = task.total, task.completed, task.description
    else:
        total, done, title = (
            progress.train_progress_bar.total,
            progress.train_progress_bar.n,
            progress.train_progress_bar.desc,
        )
    assert type(progress).__name__ == {"rich": "StepsRichProgressBar", "tqdm": "StepsTQDMProgressBar"}[bar]
    assert (total, done) == (MAX_STEPS, MAX_STEPS)
    assert title.strip().startswith("Steps") and "/-" not in title


def test_an_exception_in_the_loop_names_the_newest_checkpoint(tmp_path, cache_dir, capsys):
    """A half-done step cannot be saved and resumed exactly: the run says which checkpoint to go on from."""
    config = yaml.safe_load(resume_config(tmp_path, cache_dir).read_text())
    config["trainer"]["callbacks"].append(
        {"class_path": "probes.StopAt", "init_args": {"step": 2, "how": "error"}}
    )
    failing = write_config(config, tmp_path / "failing.yaml")
    with pytest.raises(RuntimeError, match="StopAt"), mock.patch.object(sys, "argv", ["distillens"]):
        main(["fit", "--config", str(failing)])
    last = tmp_path / "tiny" / "checkpoints" / "last.ckpt"
    assert f"RuntimeError at step 2: the newest checkpoint is {last}" in capsys.readouterr().out
    assert torch.load(last, weights_only=True)["global_step"] == 2


# ------------------------------------------------------------- Ctrl-C and last.ckpt with the shipped checkpointing (issue 21)


def shipped_config(folder: Path, cache_dir: Path, max_steps: int, *extra_callbacks: dict) -> Path:
    """configs/tiny.yaml's own callbacks: last.ckpt and the best checkpoint at each validation (every 3 steps) and
    the student exported when fit ends; outputs under ``folder``."""
    config = tiny_fit_config(folder, cache_dir, max_steps=max_steps)
    config["trainer"]["callbacks"] += list(extra_callbacks)
    return write_config(config, folder / f"shipped-{max_steps}.yaml")


@pytest.fixture(scope="module")
def interrupted_before_any_save(tmp_path_factory, cache_dir):
    """Ctrl-C before step 1's batch of a tiny.yaml run: before its first validation, so before any save of its
    ModelCheckpoint. Returns the parent of the run folder and fit's exit status."""
    folder = tmp_path_factory.mktemp("interrupted")
    stop = {"class_path": "probes.StopAt", "init_args": {"step": 1}}
    with pytest.raises(SystemExit) as exit_, mock.patch.object(sys, "argv", ["distillens"]):
        main(["fit", "--config", str(shipped_config(folder, cache_dir, 6, stop))])
    return folder, exit_.value.code


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True, mmap=True)["global_step"]


def test_ctrl_c_saves_last_ckpt_and_stops_without_validating_or_exporting(interrupted_before_any_save):
    """Lightning validates a run asked to stop (as after early stopping) and fit's end exports the student: after
    Ctrl-C that is a full validation to wait for, and a half-trained student/ beside the finished runs' ones."""
    folder, status = interrupted_before_any_save
    run = folder / "tiny"
    assert status == 130
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert saved_step(run / "checkpoints" / "last.ckpt") == 2
    assert not (run / "student").exists(), "a half-trained student was exported"
    logged = scalars(sorted(run.glob("events.out.tfevents.*")))
    assert not [name for name in logged if name.startswith("val/")], "Ctrl-C ran a validation"
    assert sorted(logged["train/loss"]) == [0, 1], "the steps trained are all logged"


def test_last_ckpt_stays_the_newest_state_after_a_resume_and_after_a_move(
    interrupted_before_any_save, tmp_path, cache_dir
):
    """The resumed run's saves go to last.ckpt (which the README exports), not to last-v1.ckpt beside a stale one:
    resumed in place after Ctrl-C, then again from a copy of the run folder elsewhere."""
    folder, _ = interrupted_before_any_save
    fit(shipped_config(folder, cache_dir, 3), "--ckpt_path", "last")  # validates, and saves, at step 3
    checkpoints = folder / "tiny" / "checkpoints"
    assert not list(checkpoints.glob("last-v*.ckpt")), sorted(p.name for p in checkpoints.iterdir())
    assert saved_step(checkpoints / "last.ckpt") == 3
    shutil.copytree(folder / "tiny", tmp_path / "tiny")  # another disk, another machine: another path
    fit(shipped_config(tmp_path, cache_dir, 6), "--ckpt_path", "last")
    moved = tmp_path / "tiny" / "checkpoints"
    assert not list(moved.glob("last-v*.ckpt")), sorted(p.name for p in moved.iterdir())
    assert saved_step(moved / "last.ckpt") == 6


def test_last_ckpt_is_the_final_step_after_a_validation_that_did_not_improve(tmp_path, cache_dir):
    """Lightning's ModelCheckpoint saves last.ckpt only with a top-k save; monitoring the falling val/loss in mode
    max makes the step-6 validation no improvement: last.ckpt must still hold step 6 (the state student/ was
    exported from), and the best checkpoint stays step 3's."""
    config = tiny_fit_config(tmp_path, cache_dir, max_steps=6)
    (checkpoint,) = [
        cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")
    ]
    checkpoint["init_args"]["mode"] = "max"
    fit(write_config(config, tmp_path / "max.yaml"))
    checkpoints = tmp_path / "tiny" / "checkpoints"
    (best,) = checkpoints.glob("step*-val*.ckpt")
    assert (saved_step(best), saved_step(checkpoints / "last.ckpt")) == (3, 6)
    assert not list(checkpoints.glob("last-v*.ckpt"))


def test_ckpt_path_best_is_the_lowest_validation_loss_of_the_run(tmp_path, cache_dir, capsys):
    """Validations at steps 3 and 6; ModelCheckpoint keeps the step<N>-val<loss>.ckpt of lower val/loss beside
    last.ckpt: `validate --ckpt_path best` in a new process uses it (found through last.ckpt's callback state, not
    last.ckpt itself); fit refuses best in one line."""
    config = shipped_config(tmp_path, cache_dir, 6)
    fit(config)
    (best,) = (tmp_path / "tiny" / "checkpoints").glob("step*-val*.ckpt")
    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["distillens"]):
        main(["validate", "--config", str(config), "--ckpt_path", "best"])
    assert f"--ckpt_path best: {best}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit), mock.patch.object(sys, "argv", ["distillens"]):
        main(["fit", "--config", str(config), "--ckpt_path", "best"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("distillens: error: --ckpt_path best: fit goes on from the newest state")


@pytest.mark.parametrize("where", ["loading the tokenizer", "building the models in fit"])
def test_ctrl_c_during_start_up_is_one_line(where, tmp_path, cache_dir, capsys, monkeypatch):
    """Before training starts (loading models, tokenising): no traceback, no checkpoint line, status 130."""
    import distillens.module

    owner, name = (
        (distillens.module, "load_tokenizer")
        if where == "loading the tokenizer"  # in the module's __init__, before Lightning's fit
        else (distillens.module.DistillationModule, "configure_model")  # inside Lightning's fit
    )
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; Python raises at the next instruction
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    with (
        pytest.raises((SystemExit, KeyboardInterrupt)) as exit_,
        mock.patch.object(sys, "argv", ["distillens"]),
    ):
        main(["fit", "--config", str(shipped_config(tmp_path, cache_dir, 6))])
    captured = capsys.readouterr()
    assert exit_.type is SystemExit and exit_.value.code == 130
    assert captured.err.strip().splitlines() == ["distillens: interrupted (Ctrl-C)"]
    assert "checkpoint" not in captured.out and "KeyboardInterrupt" not in captured.out
