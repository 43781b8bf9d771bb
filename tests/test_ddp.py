"""Data parallelism on CPU (gloo), and the token-count normalisation that makes it exact.

- `distillens fit --config configs/tiny.yaml --trainer.strategy ddp --trainer.devices 2` runs in its own process
  group with a timeout: it must succeed, shard the data over both ranks, and leave no process behind; a DDP run
  resumed mid-epoch must continue the curves of the uninterrupted one.
- Under DDP Lightning rebuilds the training loader around a distributed sampler: the rebuilt loader must keep the
  resume position, and each rank's order must depend on (seed, epoch) only.
- The objective is a token mean over the whole optimizer step: accumulated micro-batches and ranks with different
  numbers of supervised tokens must give the gradient of the token mean over all of their tokens.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import psutil
import pytest
import torch
import yaml
from helpers import DISTILLENS, REPO, subprocess_env, without_tokenizer
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.utilities.data import _update_dataloader  # what Lightning itself does under DDP
from reference import (
    Objective,
    checkpoint_student,
    grad_norm,
    probe_models,
    probe_steps,
    relative_difference,
    train_reference,
    warmup_cosine_lr,
)
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from distillens.data import EpochShuffleSampler, ResumableDataLoader
from distillens.models import ModelSpec
from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig

DATA = REPO / "data" / "instructions"
DDP_TIMEOUT_S = 240
WORLD = 2
MAX_STEPS = 6  # configs/tiny.yaml
RESUME_STEP = 4  # 20 rows over 2 ranks in batches of 4: 3 batches per epoch, so step 4 is inside epoch 1
CLIP = 0.005  # gradient clipping of the DDP runs: between their first steps' gradient norms (0.0033 to 0.006)
REPLAYED_STEPS = 3  # steps recomputed independently: two after the first, for the token count's reset

# ------------------------------------------------------------------------------------------------ real DDP runs


def ddp_args(folder: Path, cache_dir: Path, *extra: str) -> list[str]:
    """The issue's command, with outputs under folder and a checkpoint kept at every step (an overlay config)."""
    overlay = folder / "every-step.yaml"
    checkpoint_every_step = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "every_n_train_steps": 1,
            "save_top_k": -1,
            "save_last": True,
            "filename": "step{step}",
            "auto_insert_metric_name": False,
        },
    }
    probe = {"class_path": "probes.RecordRun", "init_args": {"folder": str(folder / "probe")}}
    callbacks = [checkpoint_every_step, {"class_path": "distillens.callbacks.ExportStudent"}, probe]
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "gradient_clip_val": CLIP}}))
    return [
        "fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(overlay),
        "--trainer.strategy", "ddp", "--trainer.devices", str(WORLD),
        "--trainer.logger.init_args.save_dir", str(folder), "--trainer.enable_progress_bar", "false",
        "--data.train", str(DATA / "train.jsonl"), "--data.validation", str(DATA / "validation.jsonl"),
        "--data.test", str(DATA / "test.jsonl"), "--data.cache_dir", str(cache_dir),
        *extra,
    ]  # fmt: skip


@dataclass(frozen=True)
class Finished:
    """A finished `distillens` process: exit status, its process group (its own pid) and the processes it started
    (psutil handles, which tell a process apart from a later one given the same pid)."""

    status: int
    group: int
    descendants: tuple[psutil.Process, ...]


def run_process_group(args: list[str], log: Path) -> Finished:
    """Run `distillens ARGS` in a new session (so a process group of its own), output to log.

    Descendants are collected while it runs; on timeout the whole group is killed (DDP's second rank included)
    and the test fails.
    """
    with log.open("w") as output:
        process = subprocess.Popen(
            [DISTILLENS, *args], cwd=REPO, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            env=subprocess_env(),  # this tree and the probes
        )  # fmt: skip
    descendants: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + DDP_TIMEOUT_S
    while process.poll() is None:
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants |= {
                child.pid: child for child in psutil.Process(process.pid).children(recursive=True)
            }
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"distillens {' '.join(args)} ran over {DDP_TIMEOUT_S} s; its group was killed")
        time.sleep(0.5)
    return Finished(process.returncode, process.pid, tuple(descendants.values()))


def survivors(finished: Finished) -> list[psutil.Process]:
    """Live (non-zombie) processes among the finished process's descendants or still in its group."""
    in_group = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if os.getpgid(process.pid) == finished.group:
                in_group.append(process)
    return [process for process in (*finished.descendants, *in_group) if is_alive(process)]


def is_alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def train_losses(run: Path) -> dict[int, float]:
    """{step: train/loss} from the TensorBoard event files of a run folder."""
    losses = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        losses.update({event.step: event.value for event in events.Scalars("train/loss")})
    return losses


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Finished]:
    """One DDP fit of the tiny config on two CPU processes: its folder and how it finished."""
    folder = tmp_path_factory.mktemp("ddp")
    finished = run_process_group(ddp_args(folder, folder / "cache"), folder / "output.log")
    assert finished.status == 0, (folder / "output.log").read_text()[-4000:]
    return folder, finished


def test_ddp_fit_succeeds_on_two_cpu_processes(ddp_run):
    folder, finished = ddp_run
    assert finished.descendants, "DDP started no second process"
    run = folder / "tiny"
    assert (run / "student" / "model.safetensors").is_file(), "rank 0 did not export the student"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    # each rank trains on half the 20 rows: 3 batches of 4 per epoch (1 device would make 5)
    assert checkpoint["InstructionDataModule"]["train_position"] == {"epoch": 1, "batches": 3}
    # rank 0 exported the trained student (its weights are pinned by the test below)
    exported = AutoModelForCausalLM.from_pretrained(run / "student").state_dict()
    final = checkpoint_student(run / "checkpoints" / "last.ckpt")
    assert exported.keys() == final.keys()
    for name, value in final.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=0, msg=name)


def test_ddp_steps_equal_plain_pytorch_over_both_ranks_tokens(ddp_run):
    """The plain DDP run pinned to an independent value: after each of its first steps, the weights of AdamW
    (configs/tiny.yaml: lr 1e-3, 2 warm-up steps of 6, cosine to 0.1, weight decay 0.01) clipped at CLIP, applied
    to the gradient of the token mean of the paper's objective over both ranks' batches (tests/reference.py)."""
    folder, _ = ddp_run
    probe = folder / "probe"
    student, teacher, start = probe_models(probe)
    steps = probe_steps(probe, REPLAYED_STEPS)
    assert all(len(batches) == WORLD for batches in steps)
    tokens = [[int((b["labels"][:, 1:] != -100).sum()) for b in batches] for batches in steps]
    assert all(a != b for a, b in tokens), f"ranks with equal token counts {tokens}: a weaker check"
    lrs = [warmup_cosine_lr(k, 1e-3, 2, MAX_STEPS, 0.1) for k in range(REPLAYED_STEPS)]
    objective = Objective(
        student_layers=[1], teacher_layers=[2]
    )  # the paper's defaults: reverse KL + JSD lens
    reference = train_reference(student, teacher, steps, objective, lrs, weight_decay=0.01, clip=CLIP)
    norms = [grad_norm(record.grads) for record in reference]
    assert min(norms) < CLIP < max(norms), f"clipping should act on some steps only: gradient norms {norms}"
    for step in range(1, REPLAYED_STEPS + 1):
        saved = checkpoint_student(folder / "tiny" / "checkpoints" / f"step{step}.ckpt")
        difference = relative_difference(saved, reference[step - 1].weights, start)
        assert difference < 1e-3, (
            f"weights after step {step} off the reference by {difference:.3g} of the update"
        )


def test_ddp_with_accumulation_on_cached_hidden_targets_equals_plain_pytorch(tmp_path):
    """Two gloo ranks, two micro-batches a step, the teacher's hidden states read from a cache both ranks built
    (each its shards): after each of the first steps, the weights of the plain PyTorch loop over all four
    micro-batches' tokens with the live teacher (tests/reference.py)."""
    args = ddp_args(tmp_path, tmp_path / "cache", "--model.teacher_targets.kind", "hidden",
                    "--model.teacher_targets.shard_rows", "4", "--trainer.accumulate_grad_batches", "2")  # fmt: skip
    finished = run_process_group(args, tmp_path / "output.log")
    assert finished.status == 0, (tmp_path / "output.log").read_text()[-4000:]
    assert not survivors(finished)
    (cache,) = (tmp_path / "cache" / "teacher").glob("hidden-*")
    assert (cache / "manifest.json").is_file()
    # 20 rows a split in shards of 4: 5 training and 5 validation shards, each rank writing every second one
    assert (
        len(list(cache.glob("train-*.safetensors"))) == len(list(cache.glob("validation-*.safetensors"))) == 5
    )
    probe = tmp_path / "probe"
    student, teacher, start = probe_models(probe)
    steps = probe_steps(probe, REPLAYED_STEPS)
    # two micro-batches on each rank, but an epoch's third batch ends its step alone (3 batches per rank)
    assert [len(batches) for batches in steps] == [2 * WORLD, WORLD, 2 * WORLD]
    lrs = [warmup_cosine_lr(k, 1e-3, 2, MAX_STEPS, 0.1) for k in range(REPLAYED_STEPS)]
    objective = Objective(student_layers=[1], teacher_layers=[2])
    reference = train_reference(student, teacher, steps, objective, lrs, weight_decay=0.01, clip=CLIP)
    for step in range(1, REPLAYED_STEPS + 1):
        saved = checkpoint_student(tmp_path / "tiny" / "checkpoints" / f"step{step}.ckpt")
        difference = relative_difference(saved, reference[step - 1].weights, start)
        assert difference < 1e-3, (
            f"weights after step {step} off the reference by {difference:.3g} of the update"
        )


def fsdp_args(folder: Path, cache_dir: Path, kind: str, *extra: str) -> list[str]:
    """The DDP run's arguments under configs/trainer/fsdp.yaml (teacher and student sharded), its teacher targets
    cached in shards of 4 rows: 5 shards a split, so one rank builds three and the other two and a spare forward."""
    fsdp = ("--config", str(REPO / "configs" / "trainer" / "fsdp.yaml"), "--trainer.devices", str(WORLD))
    targets = ("--model.teacher_targets.kind", kind, "--model.teacher_targets.shard_rows", "4")
    return ddp_args(folder, cache_dir, *fsdp, *targets, *extra)


def test_fsdp_on_cached_hidden_targets_gives_the_ddp_live_curve(ddp_run, tmp_path):
    """A sharded teacher's forward is a collective, so both ranks must run as many: the build finishes, and the
    loss curve equals the DDP run's with the live teacher (the same batches, the same gradient averaging)."""
    finished = run_process_group(fsdp_args(tmp_path, tmp_path / "cache", "hidden"), tmp_path / "output.log")
    assert finished.status == 0, (tmp_path / "output.log").read_text()[-4000:]
    assert not survivors(finished)
    (cache,) = (tmp_path / "cache" / "teacher").glob("hidden-*")
    assert len(list(cache.glob("train-*.safetensors"))) == 5 and (cache / "manifest.json").is_file()
    live, cached = train_losses(ddp_run[0] / "tiny"), train_losses(tmp_path / "tiny")
    assert sorted(cached) == sorted(live) == list(range(MAX_STEPS))
    for step, loss in live.items():
        assert cached[step] == pytest.approx(loss, rel=1e-5), f"train/loss at step {step}"


def test_fsdp_builds_the_single_process_topk_cache(tmp_path):
    """`distillens teach` with top-k targets on two FSDP ranks (spare forwards included) writes the tensors one
    process writes."""
    k = ("--model.teacher_targets.k", "8")
    for run in ("fsdp", "single"):
        (tmp_path / run).mkdir()
    fsdp = fsdp_args(
        tmp_path / "fsdp", tmp_path / "fsdp-cache", "topk", *k, "--model.teacher_targets.build_only", "true"
    )
    finished = run_process_group(fsdp, tmp_path / "output.log")
    assert finished.status == 0, (tmp_path / "output.log").read_text()[-4000:]
    single = ddp_args(tmp_path / "single", tmp_path / "single-cache", "--trainer.devices", "1", "--trainer.strategy", "auto",
                      "--model.teacher_targets.kind", "topk", "--model.teacher_targets.shard_rows", "4", *k,
                      "--model.teacher_targets.build_only", "true")  # fmt: skip
    assert run_process_group(single, tmp_path / "single.log").status == 0, (
        tmp_path / "single.log"
    ).read_text()[-4000:]
    (sharded,) = (tmp_path / "fsdp-cache" / "teacher").glob("topk-*")
    (one,) = (tmp_path / "single-cache" / "teacher").glob("topk-*")
    shards = sorted(path.name for path in one.glob("*.safetensors"))
    assert len(shards) == 10 and sorted(path.name for path in sharded.glob("*.safetensors")) == shards
    for name in shards:
        expected, actual = load_file(one / name), load_file(sharded / name)
        assert sorted(actual) == sorted(expected), name
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")


def test_ddp_fit_leaves_no_process_behind(ddp_run):
    _, finished = ddp_run
    assert not survivors(finished)


def test_ddp_resume_continues_the_loss_curve(ddp_run, tmp_path):
    folder, _ = ddp_run
    reference = train_losses(folder / "tiny")
    checkpoint = folder / "tiny" / "checkpoints" / f"step{RESUME_STEP}.ckpt"
    args = ddp_args(tmp_path, folder / "cache", "--ckpt_path", str(checkpoint))
    finished = run_process_group(args, tmp_path / "output.log")
    assert finished.status == 0, (tmp_path / "output.log").read_text()[-4000:]
    assert not survivors(finished)
    resumed = train_losses(tmp_path / "tiny")
    assert sorted(resumed) == list(range(RESUME_STEP, MAX_STEPS))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-6, abs=0), f"train/loss at step {step}"


# ------------------------------------------------------------------------------------------------ sharded order


def rank_loader(base: ResumableDataLoader, rank: int, epoch: int) -> DataLoader:
    """The loader Lightning builds for one rank: the same class and arguments, a distributed sampler."""
    sampler = DistributedSamplerWrapper(base.sampler, num_replicas=WORLD, rank=rank, shuffle=True, seed=42)
    loader = _update_dataloader(base, sampler)
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch (forwarded to our sampler)
    return loader


def make_loader(resume_at: dict[str, int] | None = None) -> ResumableDataLoader:
    rows = torch.arange(22)
    sampler = EpochShuffleSampler(len(rows), seed=7)
    return ResumableDataLoader(rows, batch_size=3, sampler=sampler, resume_at=resume_at)


@pytest.mark.parametrize("rank", range(WORLD))
def test_rebuilt_rank_loader_resumes_at_the_next_batch(rank):
    epoch, taken = 1, 2
    reference = [batch.tolist() for batch in rank_loader(make_loader(), rank, epoch)]
    interrupted = rank_loader(make_loader(), rank, epoch)
    batches = iter(interrupted)
    for _ in range(taken):
        next(batches)
    state = interrupted.state_dict()
    assert state == {"epoch": epoch, "batches": taken}

    torch.manual_seed(1234)  # a restarted process: another global random state
    resumed = [batch.tolist() for batch in rank_loader(make_loader(resume_at=state), rank, epoch)]
    assert resumed == reference[taken:]


def test_resume_position_applies_to_its_own_epoch_only():
    loader = rank_loader(make_loader(resume_at={"epoch": 0, "batches": 2}), rank=0, epoch=1)
    assert len(list(loader)) == len(loader)


# ------------------------------------------------------------------------------------------------ token normalisation

VOCAB = 97


def tiny_llama(layers: int, hidden: int) -> ModelSpec:
    config = dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return ModelSpec(config=config, tokenizer="unused")


class GradientRecorder(DistillationModule):
    """Keeps the student's gradients as the optimizer receives them (after the module's token rescaling)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.recorded = {name: p.grad.clone() for name, p in self.student.named_parameters()}


@pytest.fixture
def module(monkeypatch) -> GradientRecorder:
    without_tokenizer(monkeypatch)  # no tokenizer needed
    module = GradientRecorder(
        student=tiny_llama(2, 32),
        teacher=tiny_llama(3, 48),
        loss=LossConfig(ce_weight=0.4, kd_weight=0.6, lens_weight=0.8, chunk_size=7),
        layers=LayerPairs(student=[1], teacher=[2]),
    )
    module.configure_model()
    return module


def micro_batch(seed: int, response_starts: list[int]) -> dict[str, torch.Tensor]:
    """Two rows of 10 tokens; row r is supervised from position response_starts[r] on."""
    input_ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))  # (B, T)
    labels = torch.full_like(input_ids, -100)  # (B, T)
    for row, start in enumerate(response_starts):
        labels[row, start:] = input_ids[row, start:]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


# different supervised-token counts: 8 + 2 = 10 (9 predicted) and 3 + 4 = 7 (5 predicted)
MICRO_BATCHES = [micro_batch(1, [2, 8]), micro_batch(2, [7, 6])]


def token_mean_gradients(module: DistillationModule, batches: list[dict], weights: dict) -> dict:
    """Independent reference: the gradient of the objective's token mean over the concatenated batches."""
    module.student.load_state_dict(weights)
    module.student.zero_grad()
    joined = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}  # (sum B, T)
    terms = module(joined)
    (terms.total() / terms["tokens"]).backward()
    return {name: p.grad.clone() for name, p in module.student.named_parameters()}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_accumulated_micro_batches_give_the_token_mean_gradient(module):
    weights = copy.deepcopy(module.student.state_dict())
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(MICRO_BATCHES, batch_size=None))
    assert_same_gradients(module.recorded, token_mean_gradients(module, MICRO_BATCHES, weights))


class SummingStrategy:
    """Stands in for DDP's all-reduce of the token count: this rank's count plus the other ranks' counts."""

    def __init__(self, other_ranks_tokens: int) -> None:
        self.other_ranks_tokens = other_ranks_tokens

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return tensor + self.other_ranks_tokens


def test_ranks_with_different_token_counts_give_the_token_mean_gradient(module, monkeypatch):
    """Two ranks, one micro-batch each: DDP averages their gradients, then the hook rescales on rank 0."""
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # no trainer to log to
    weights = copy.deepcopy(module.student.state_dict())
    per_rank, tokens = [], []
    for batch in MICRO_BATCHES:
        module.student.zero_grad()
        module._window_tokens = 0
        module.training_step(batch, 0).backward()
        per_rank.append({name: p.grad.clone() for name, p in module.student.named_parameters()})
        tokens.append(module._window_tokens)
    for name, param in module.student.named_parameters():  # DDP's gradient all-reduce: the mean over ranks
        param.grad = (per_rank[0][name] + per_rank[1][name]) / WORLD
    module._window_tokens = tokens[0]  # rank 0's own count; the strategy adds rank 1's
    module.trainer = SimpleNamespace(
        world_size=WORLD,
        accumulate_grad_batches=1,
        strategy=SummingStrategy(other_ranks_tokens=tokens[1]),
        global_step=0,  # read by the objective's lens draw
    )
    optimizer = torch.optim.SGD(module.student.parameters(), lr=0.0)
    module.on_before_optimizer_step(optimizer)
    assert_same_gradients(module.recorded, token_mean_gradients(module, MICRO_BATCHES, weights))
