"""On-policy training (model.on_policy): micro-batches rebuilt on the student's or the teacher's generated answers.

- The rebuilt batch is the one TrainingCollator pads from the prompt and the generated ids, up to and including the
  first eos (all of them when an answer was cut at max_new_tokens), bit for bit.
- Fractions 0 are today's path: the same loss and gradients bit for bit, whatever the sampling settings.
- Fraction 1 supervises exactly the generated tokens: the step's loss and gradients are the objective's on a batch
  hand-built from the same generated ids; the student's answers carry no cross-entropy, the teacher's do.
- The choice is a pure function of (seed, step, micro-batch): identical on both ranks of a real gloo DDP run, and
  a run resumed after kill -9 logs what the uninterrupted one logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from helpers import (
    DISTILLENS,
    REPO,
    build_tiny_module,
    checkpoint_every_step,
    scalars,
    subprocess_env,
    tiny_fit_config,
    without_tokenizer,
    write_config,
)
from reference import tiny_llama

import distillens.onpolicy as onpolicy
from distillens.data.collate import TrainingCollator, pad_sequences
from distillens.lightning_cli import run_cli
from distillens.lora import LoraSpec, is_lora
from distillens.models import ModelSpec
from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig, Objective
from distillens.onpolicy import (
    HAS_REFERENCE,
    REFERENCE,
    STUDENT,
    TEACHER,
    OnPolicyConfig,
    answer_lengths,
    choose_source,
    left_padded_prompts,
    rebuild,
)
from distillens.sampling import CHOICE_STREAM, draw_seed

VOCAB, PAD, EOS = 101, 0, 3
PROMPTS = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]
RESPONSES = [[41, 42, 43, EOS], [EOS], [61, 62, EOS]]


def collated(prompts, responses) -> dict[str, torch.Tensor]:
    """The batch TrainingCollator makes of these prompts and responses: the hand-built reference of every test."""
    features = [
        {"input_ids": p + r, "prompt_length": len(p)} for p, r in zip(prompts, responses, strict=True)
    ]
    return TrainingCollator(PAD)(features)


def assert_same_batch(got: dict, want: dict) -> None:
    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        assert torch.equal(got[key], want[key]), key


# ----------------------------------------------------------------------------------------------------------------
# Rebuilding a batch on generated ids (pure torch)


def test_prompts_are_left_padded_for_generation():
    input_ids, attention_mask = left_padded_prompts(collated(PROMPTS, RESPONSES), PAD)
    assert input_ids.tolist() == [[0, 0, 11, 12, 13], [21, 22, 23, 24, 25], [0, 0, 0, 31, 32]]
    assert attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_rebuilt_batch_supervises_the_answers_up_to_and_including_eos():
    new_ids = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD, PAD],  # eos third: three tokens
            [EOS, PAD, PAD, PAD, PAD, PAD],  # eos first: the eos alone
            [9, 8, 7, 6, 5, 4],  # cut at max_new_tokens: no eos, all six
        ]
    )  # (B, G)
    lengths = answer_lengths(new_ids, EOS)
    assert lengths.tolist() == [3, 1, 6]
    batch = rebuild(collated(PROMPTS, RESPONSES), new_ids, lengths, PAD, has_reference=False)
    want = collated(PROMPTS, [[5, 6, EOS], [EOS], [9, 8, 7, 6, 5, 4]])
    assert_same_batch(batch, want)
    assert batch[HAS_REFERENCE] is False
    assert int((batch["labels"] != -100).sum()) == 3 + 1 + 6


def test_the_collator_keeps_each_prompt_length_and_on_policy_needs_it():
    batch = collated(PROMPTS, RESPONSES)
    assert batch["prompt_lengths"].tolist() == [len(prompt) for prompt in PROMPTS]
    del batch["prompt_lengths"]  # a batch built by hand, without them
    with pytest.raises(ValueError, match="each row's prompt length: batch key 'prompt_lengths'"):
        left_padded_prompts(batch, PAD)


def test_packed_or_left_padded_rows_are_refused():
    batch = collated(PROMPTS, RESPONSES)
    with pytest.raises(ValueError, match="right-padded"):
        left_padded_prompts({**batch, "attention_mask": batch["attention_mask"].flip(1)}, PAD)
    with pytest.raises(ValueError, match="packed"):
        left_padded_prompts({**batch, "position_ids": torch.zeros_like(batch["position_ids"])}, PAD)


# ----------------------------------------------------------------------------------------------------------------
# The choice of a micro-batch's source


def test_choice_is_a_pure_function_of_its_seed_with_the_configured_frequencies():
    config = OnPolicyConfig(student_fraction=0.5, teacher_fraction=0.2)
    seeds = [draw_seed(42, step, micro, CHOICE_STREAM) for step in range(1000) for micro in range(2)]
    sources = [choose_source(config, seed) for seed in seeds]
    assert sources == [choose_source(config, seed) for seed in seeds]
    for source, p in ((STUDENT, 0.5), (TEACHER, 0.2), (REFERENCE, 0.3)):
        sigma = (len(seeds) * p * (1 - p)) ** 0.5
        assert abs(sources.count(source) - len(seeds) * p) < 5 * sigma, source
    assert {choose_source(OnPolicyConfig(), seed) for seed in seeds} == {REFERENCE}


def test_nothing_is_drawn_before_the_start_step():
    """Reference answers first, the student's own later: before ``start_step`` every micro-batch is the data set's;
    from it on, the configured fraction (here all of them) is the student's."""
    config = OnPolicyConfig(student_fraction=1.0, start_step=3)
    seeds = [draw_seed(42, step, 0, CHOICE_STREAM) for step in range(6)]
    sources = [choose_source(config, seed, step) for step, seed in enumerate(seeds)]
    assert sources == [REFERENCE] * 3 + [STUDENT] * 3


def test_a_start_step_keeps_the_first_steps_on_the_references(monkeypatch, batch, recorded):
    """The module passes its optimizer step: at step 0 with start_step 1, nothing is generated and the loss is the
    reference batch's, although every micro-batch would otherwise be the student's."""
    module = build(monkeypatch, student_fraction=1.0, start_step=1)
    loss, gradient = step(module, batch)
    want_loss, want_gradient = objective(module, batch)
    assert recorded == [] and module.rollouts.sources == [REFERENCE]
    assert torch.equal(loss, want_loss) and torch.equal(gradient, want_gradient)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"student_fraction": 0.5, "start_step": -1}, "start_step=-1"),
        ({"student_fraction": 1.5}, "student_fraction=1.5: use a fraction in \\[0, 1\\]"),
        ({"student_fraction": 0.7, "teacher_fraction": 0.5}, "= 1.2 > 1"),
        ({"student_fraction": 0.5, "max_new_tokens": 0}, "max_new_tokens=0"),
        ({"student_fraction": 0.5, "temperature": 0.0}, "temperature=0.0"),
    ],
)
def test_bad_options_are_one_clear_error(monkeypatch, options, message):
    with pytest.raises(ValueError, match=message):
        build(monkeypatch, **options)


def test_teacher_answers_need_a_teacher_and_student_answers_a_teacher_term(monkeypatch):
    without_tokenizer(monkeypatch)
    with pytest.raises(ValueError, match="teacher_fraction > 0 needs model.teacher"):
        OnPolicyConfig(teacher_fraction=0.5).check(has_teacher=False, reads_teacher=False)
    with pytest.raises(ValueError, match="student_fraction > 0 needs a teacher term"):
        build(
            monkeypatch, student_fraction=0.5, loss=LossConfig(ce_weight=1.0, kd_weight=0.0, lens_weight=0.0)
        )


def test_sequence_level_kd_with_cross_entropy_alone_trains_on_the_teachers_answers(
    monkeypatch, batch, recorded
):
    """CE treats the teacher's answers as references (README, On-policy training): with CE as the only term,
    teacher_fraction is sequence-level KD in its classic form, and the step is CE on the teacher's answers."""
    module = build(
        monkeypatch, loss=LossConfig(ce_weight=1.0, kd_weight=0.0, lens_weight=0.0), teacher_fraction=1.0,
        max_new_tokens=4,
    )  # fmt: skip
    loss, gradient = step(module, batch)
    (call,) = recorded
    assert call["model"] is module.teacher
    want_loss, want_gradient = objective(module, hand_built(call["new_ids"]))
    assert torch.equal(loss, want_loss) and torch.equal(gradient, want_gradient) and float(loss) > 0


# ----------------------------------------------------------------------------------------------------------------
# Training steps on tiny random models


def build(monkeypatch, loss: LossConfig | None = None, eos: int = EOS, **on_policy) -> DistillationModule:
    """A tiny module (the same weights every call) with a CE term, so that its treatment shows in the loss."""
    torch.manual_seed(0)
    module = build_tiny_module(
        monkeypatch,
        student=(2, 32),
        teacher=(4, 48),
        vocab=VOCAB,
        loss=loss or LossConfig(ce_weight=0.5, kd_weight=1.0, lens_weight=1.0, chunk_size=4),
        layers=LayerPairs(student=[1, 2], teacher=[2, 3]),
        on_policy=OnPolicyConfig(**on_policy),
    )
    module.tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=PAD)
    return module.train()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return collated(PROMPTS, RESPONSES)


def step(module: DistillationModule, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's loss (a token sum) and the gradient of the student's parameters, flattened."""
    module.zero_grad(set_to_none=False)
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in module.student.parameters()]).clone()


def objective(module: DistillationModule, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's weighted token sum and its gradient on ``batch``, without any on-policy machinery."""
    module.zero_grad(set_to_none=False)
    loss = module(batch).total()
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in module.student.parameters()]).clone()


@pytest.fixture
def recorded(monkeypatch) -> list[dict]:
    """Every generation of the run: the model, its left-padded prompts and the new ids. Row 0's answer is cut by
    an eos at its second token (what a model that stops early produces), so every test sees an eos and padding."""
    calls = []
    real = onpolicy.generate_ids

    def spy(model, input_ids, attention_mask, config, **options):
        new_ids = real(model, input_ids, attention_mask, config, **options).clone()  # (B, G)
        new_ids[0, 1], new_ids[0, 2:] = EOS, PAD
        calls.append({"model": model, "prompts": input_ids, "new_ids": new_ids, "config": config})
        return new_ids

    monkeypatch.setattr(onpolicy, "generate_ids", spy)
    return calls


def hand_built(new_ids: torch.Tensor, **key) -> dict:
    """The batch of PROMPTS and each row's generated ids up to its first eos (Python lists, not onpolicy's code)."""
    answers = []
    for row in new_ids.tolist():
        answers.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return {**collated(PROMPTS, answers), **key}


def test_fraction_zero_is_todays_loss_and_gradient_bit_for_bit(monkeypatch, batch, recorded):
    today = build(monkeypatch)
    zero = build(monkeypatch, student_fraction=0.0, teacher_fraction=0.0, max_new_tokens=3, temperature=0.5)
    for micro in range(3):
        today._window_batches = zero._window_batches = micro
        want, got = objective(today, batch), step(zero, batch)  # the objective alone, no on-policy code
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert recorded == [] and zero._window_tokens == 3 * (4 + 1 + 3)


def test_each_micro_batch_of_a_step_is_a_draw_of_its_own(monkeypatch, batch):
    """Accumulating gradients, every micro-batch of one optimizer step draws anew: its source (and so its answers'
    sampling seed) and its sampled lens pairs. Unit tests elsewhere set the micro-batch counter by hand and fits
    run one micro-batch a step, so this is where a counter that never moves shows."""
    loss = LossConfig(kd_weight=1.0, lens_weight=1.0, chunk_size=4, lens_pairs_per_step=1, fused=False)
    module = build(monkeypatch, loss=loss, student_fraction=0.5)
    choice_seeds, lens_seeds = [], []

    def choose(config, seed, step=0):
        choice_seeds.append(seed)
        return REFERENCE  # no generation: the seeds are what is checked

    real_objective = Objective.__call__

    def objective_spy(self, batch, *, training, draw_seed=0):
        lens_seeds.append(draw_seed)
        return real_objective(self, batch, training=training, draw_seed=draw_seed)

    monkeypatch.setattr("distillens.module.choose_source", choose)
    monkeypatch.setattr(Objective, "__call__", objective_spy)
    for _ in range(3):  # three micro-batches of global step 0
        module.training_step(batch, 0)
    assert len(set(choice_seeds)) == 3 and len(set(lens_seeds)) == 3, (choice_seeds, lens_seeds)


def test_student_fraction_one_supervises_exactly_the_generated_tokens(monkeypatch, batch, recorded):
    module = build(monkeypatch, student_fraction=1.0, max_new_tokens=5)
    loss, gradient = step(module, batch)
    (call,) = recorded
    assert call["model"] is module.student and call["config"].max_new_tokens == 5 and call["config"].do_sample
    assert torch.equal(call["prompts"], pad_sequences(PROMPTS, PAD, "left", None)[0])
    want = hand_built(call["new_ids"], has_reference=False)
    want_loss, want_gradient = objective(module, want)
    assert torch.equal(loss, want_loss) and torch.equal(gradient, want_gradient)
    # the step's token count is every generated token (row 0: two, the others: five each, cut without eos)
    assert module._window_tokens == int((want["labels"] != -100).sum()) == 2 + 5 + 5
    assert module.rollouts.sources == [STUDENT] and module.rollouts.tokens == 12
    # the student's answers carry no cross-entropy: with it, the loss would differ
    assert not torch.equal(objective(module, {**want, "has_reference": True})[0], loss)


def test_teacher_answers_are_supervised_the_same_way_with_cross_entropy(monkeypatch, batch, recorded):
    module = build(monkeypatch, teacher_fraction=1.0, max_new_tokens=4)
    loss, gradient = step(module, batch)
    (call,) = recorded
    assert call["model"] is module.teacher
    want = hand_built(call["new_ids"])  # the teacher's answers stand as references: cross-entropy included
    want_loss, want_gradient = objective(module, want)
    assert torch.equal(loss, want_loss) and torch.equal(gradient, want_gradient)
    assert module.rollouts.sources == [TEACHER]


def test_answers_cut_at_max_new_tokens_are_supervised_as_they_stand(monkeypatch, batch):
    module = build(
        monkeypatch, student_fraction=1.0, max_new_tokens=4, eos=VOCAB
    )  # an eos it can never sample
    step(module, batch)
    assert module._window_tokens == 3 * 4 and module.rollouts.tokens == 12


def test_lora_student_answers_with_its_adapters_and_trains_them_alone(monkeypatch, batch, recorded):
    without_tokenizer(monkeypatch)
    torch.manual_seed(0)
    module = DistillationModule(
        student=ModelSpec(**tiny_llama(2, 32, VOCAB), lora=LoraSpec(r=4)),
        teacher=tiny_llama(4, 48, VOCAB),
        layers=LayerPairs(student=[1, 2], teacher=[2, 3]),
        on_policy=OnPolicyConfig(student_fraction=1.0, max_new_tokens=4),
    )
    module.configure_model()
    module.tokenizer = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    module.train().zero_grad(set_to_none=True)
    module.training_step(batch, 0).backward()
    (call,) = recorded
    assert call["model"] is module.student and is_lora(module.student)
    trained = {name for name, p in module.student.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in name for name in trained)


def test_on_policy_step_runs_under_bf16_autocast(monkeypatch, batch):
    module = build(monkeypatch, student_fraction=1.0, max_new_tokens=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Real runs: the logged curves, resume after kill -9, two gloo ranks

ON_POLICY = {"student_fraction": 0.5, "teacher_fraction": 0.25, "max_new_tokens": 8}
CURVES = ("train/loss", "train/on_policy", "train/seq_kd", "train/gen_length")


def run_config(folder: Path, cache_dir: Path, **trainer) -> Path:
    config = tiny_fit_config(folder, cache_dir, max_steps=6, limit_val_batches=0, **trainer)
    config["trainer"]["callbacks"] = [checkpoint_every_step(save_last=True)]
    config["model"]["on_policy"] = ON_POLICY
    return write_config(config, folder / "onpolicy.yaml")


def curves(run: Path) -> dict[str, dict[int, float]]:
    return scalars(sorted(run.glob("events.out.tfevents.*")))


def fit(config: Path, *extra: str):
    with mock.patch.object(sys, "argv", ["distillens"]):
        return run_cli(["fit", "--config", str(config), *extra])


def test_resume_after_kill_9_replaces_and_generates_what_the_uninterrupted_run_did(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "reference").mkdir(), (tmp_path / "killed").mkdir()
    fit(run_config(tmp_path / "reference", cache))
    reference = curves(tmp_path / "reference" / "tiny")
    assert set(CURVES) | {"train/gen_time"} <= set(reference)
    assert set(reference["train/on_policy"].values()) == {0.0, 1.0}  # both kinds of step in six
    config = run_config(tmp_path / "killed", cache)
    checkpoints = tmp_path / "killed" / "tiny" / "checkpoints"
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [DISTILLENS, "fit", "--config", str(config)], cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True, env=subprocess_env(),
        )  # fmt: skip
    try:
        while not (checkpoints / "step3.ckpt").exists():
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < killed_at < 6
    before = set((tmp_path / "killed" / "tiny").glob("events.out.tfevents.*"))
    fit(config, "--ckpt_path", "last")
    resumed = scalars(
        sorted(set((tmp_path / "killed" / "tiny").glob("events.out.tfevents.*")) - before), CURVES
    )
    assert set(resumed) >= {"train/loss", "train/on_policy"}
    for name, values in resumed.items():
        assert min(values) >= killed_at
        assert set(values) == {at for at in reference[name] if at >= killed_at}, (
            f"{name} logged at {sorted(values)}"
        )
        for at, value in values.items():
            assert value == pytest.approx(reference[name][at], rel=1e-6, abs=0), f"{name} at step {at}"


DRAW_WORKER = """
import os
import sys
import torch
import torch.distributed as dist
from distillens.onpolicy import STUDENT, TEACHER, check_same_draw

store, rank = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
check_same_draw(STUDENT, 42, 3, 1, torch.device("cpu"))  # the same draw on both ranks: nothing to say
try:
    check_same_draw(STUDENT if rank == 0 else TEACHER, 42 + 7 * rank, 3, 1, torch.device("cpu"))
except ValueError as error:
    print(error, flush=True)
    os._exit(0)  # skips gloo's teardown, which can abort (SIGABRT) once the other rank has gone
os._exit(3)
"""


def test_ranks_that_draw_differently_stop_at_once_with_one_error(tmp_path):
    """Two real gloo processes: the same draw passes; different ones raise the same error on both ranks within
    seconds, where a rank generating alone would wait forever for the other (the test's former 300 s hang)."""
    started = time.monotonic()
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", DRAW_WORKER, str(tmp_path / "store"), str(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
        )  # fmt: skip
        for rank in (0, 1)
    ]
    try:
        outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    for output in outputs:
        line = output.strip().splitlines()[-1]
        assert line.startswith("model.on_policy: the ranks drew differently for one micro-batch"), output
        assert "rank 0: student (run seed 42, step 3, micro-batch 1)" in line
        assert "rank 1: teacher (run seed 49, step 3, micro-batch 1)" in line and "seed_everything" in line
    assert time.monotonic() - started < 120


def test_a_step_checks_its_draw_against_the_other_ranks(monkeypatch, batch):
    """With several ranks, the training step compares its draw with theirs before generating (check_same_draw):
    here the other rank drew the teacher where this one drew the student."""
    module = build(monkeypatch, student_fraction=1.0)
    monkeypatch.setattr(onpolicy, "several_ranks", lambda: True)
    monkeypatch.setattr(onpolicy.dist, "get_world_size", lambda: 2)

    def all_gather(outputs, mine):
        outputs[0].copy_(mine)
        outputs[1].copy_(mine)
        outputs[1][0] = onpolicy.SOURCES.index(TEACHER)

    monkeypatch.setattr(onpolicy.dist, "all_gather", all_gather)
    with pytest.raises(ValueError, match=r"rank 0: student .*; rank 1: teacher"):
        module.training_step(batch, 0)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_both_gloo_ranks_draw_the_same_sources_and_generate_together(tmp_path, strategy):
    """A real two-process fit, DDP accumulating two micro-batches a step or FSDP2 (whose every forward, generation
    included, is a collective): each rank records the sources of every step's micro-batches (tests/probes.py); a
    rank generating alone would hang the run."""
    values = yaml.safe_load(run_config(tmp_path, tmp_path / "cache").read_text())
    probe = {"class_path": "probes.RecordSources", "init_args": {"folder": str(tmp_path / "probe")}}
    values["trainer"].update(callbacks=[probe], enable_checkpointing=False, max_steps=4, strategy="ddp")
    overlay, accumulated = [], 1
    if strategy == "ddp":
        values["trainer"]["accumulate_grad_batches"] = accumulated = 2
    if strategy == "fsdp":
        del values["trainer"]["strategy"]
        overlay = ["--config", str(REPO / "configs" / "trainer" / "fsdp.yaml")]
    config = write_config(values, tmp_path / f"{strategy}.yaml")
    log = tmp_path / f"{strategy}.log"
    with log.open("w") as output:
        finished = subprocess.run(
            [DISTILLENS, "fit", "--config", str(config), *overlay, "--trainer.devices", "2"], cwd=REPO,
            stdout=output, stderr=subprocess.STDOUT, env=subprocess_env(), timeout=300,
            start_new_session=True,
        )  # fmt: skip
    assert finished.returncode == 0, log.read_text()[-3000:]
    ranks = [json.loads((tmp_path / "probe" / f"sources-rank{rank}.json").read_text()) for rank in (0, 1)]
    # three micro-batches per rank and epoch: accumulating two, each epoch's last step has one
    expected = [2, 1, 2, 1] if accumulated == 2 else [1] * 4
    assert ranks[0] == ranks[1] and [len(sources) for sources in ranks[0]] == expected
    drawn = {source for sources in ranks[0] for source in sources}
    assert {STUDENT, TEACHER} <= drawn, ranks[0]
