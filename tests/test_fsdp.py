"""Scale on CPU: FSDP2 over two gloo processes reproduces single-process training; bf16; the lens-term switch.

The sharded run (student and teacher in per-block FSDP2 units, tied embeddings, activation checkpointing of the
student, gradient clipping) must give the single-process loss, gradients and weights on the same batches, resume
from its sharded checkpoint, and export one Hugging Face folder. This file is also that run's worker:
``python tests/test_fsdp.py WORKDIR`` is one rank, with RANK, WORLD_SIZE and MASTER_PORT in its environment as
torchrun sets them (Lightning then launches nothing itself).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, free_port, subprocess_env
from reference import Objective, grad_norm, objective_sums, relative_difference, train_reference, weighted
from tokenizers import Tokenizer, models
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from distillens.callbacks import ExportStudent
from distillens.distributed import FSDP2Strategy
from distillens.export import export_checkpoint
from distillens.models import ModelSpec
from distillens.module import DistillationModule
from distillens.sharding import full_state_dict, is_sharded

WORLD = 2
STEPS = 3  # the sharded run trains 2 steps, saves, and resumes for the third
ROWS, LENGTH, VOCAB = 4, 12, 1024
CLIP = 0.05  # small enough that clipping acts, so the sharded gradient norm is checked too
WORKER_TIMEOUT_S = 240
TEACHER = dict(
    model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
)  # fmt: skip
STUDENT = dict(TEACHER, hidden_size=32, intermediate_size=64, num_hidden_layers=2)


# ----------------------------------------------------------------------------------------------------------------
# One training run, shared by the single-process reference and the sharded worker


def make_module(workdir: Path, *, checkpointing: bool = False, **loss) -> DistillationModule:
    """Every term on (CE, final-layer KD, lens, MSE baseline); constant learning rate, so runs of any length agree."""
    return DistillationModule(
        student=ModelSpec(source=str(workdir / "student"), gradient_checkpointing=checkpointing),
        teacher=ModelSpec(source=str(workdir / "teacher")),
        loss={"ce_weight": 0.5, "mse_weight": 0.5, **loss},
        layers={"student": [1], "teacher": [2]},
        optimizer={"lr": 1e-2, "warmup": 0, "min_lr_ratio": 1.0},
    )


def rows() -> list[dict[str, Tensor]]:
    """Four rows with different prompt lengths, one right-padded: each row masks different tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)  # (B, T)
    attention_mask = torch.ones_like(input_ids)  # (B, T)
    attention_mask[3, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, T)
    for row, prompt in enumerate((2, 4, 6, 3)):
        labels[row, :prompt] = -100
    return [
        {"input_ids": i, "attention_mask": a, "labels": y}
        for i, a, y in zip(input_ids, attention_mask, labels, strict=True)
    ]


def full(tensor: Tensor) -> Tensor:
    """A plain CPU copy of a tensor or of a sharded DTensor (a collective then: every rank calls)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


class Recorder(L.Callback):
    """After each optimizer step: the objective's token sum over all ranks and the full student weights; after the
    first step, the full gradients as the optimizer used them (token-normalised, clipped)."""

    def __init__(self) -> None:
        self.totals: dict[int, float] = {}
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.grads: dict[str, Tensor] | None = None
        self.projections: list[Tensor] | None = None  # the MSE projections' initial weights

    def on_train_start(self, trainer, pl_module) -> None:
        self.projections = [full(proj.weight) for proj in pl_module.projections]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.totals[step] = float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="sum"))
        if self.grads is None:
            self.grads = {name: full(p.grad) for name, p in pl_module.student.named_parameters()}
        student = pl_module.student
        state = full_state_dict(student) if is_sharded(student) else student.state_dict()
        self.weights[step] = {name: value.detach().clone() for name, value in state.items()}


def fit(
    workdir: Path,
    *,
    max_steps: int,
    export: Path,
    devices: int = 1,
    ckpt_path: Path | None = None,
    checkpointing: bool = False,
    **trainer_options,
) -> tuple[L.Trainer, Recorder]:
    """Train on the four rows (one batch per epoch: all of them in one process, two per rank when sharded).

    Seeded for the MSE projections, the only randomly initialised weights (Lightning reseeds each rank the same).
    ``trainer_options`` (accelerator, strategy, precision) default to one fp32 CPU process.
    """
    L.seed_everything(0, verbose=False)
    recorder = Recorder()
    trainer = L.Trainer(
        devices=devices, max_steps=max_steps, gradient_clip_val=CLIP, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, ExportStudent(str(export))],
        **{"accelerator": "cpu", **trainer_options},
    )  # fmt: skip
    loader = DataLoader(rows(), batch_size=ROWS // devices)
    trainer.fit(make_module(workdir, checkpointing=checkpointing), loader, ckpt_path=ckpt_path)
    return trainer, recorder


def worker(workdir: Path) -> None:
    """One rank of the sharded run: 2 steps, a sharded checkpoint, a resumed third step; rank 0 saves the record."""
    sharded = lambda: dict(devices=WORLD, strategy=FSDP2Strategy(), checkpointing=True)  # noqa: E731  one per run
    checkpoint = workdir / "sharded.ckpt"
    first_trainer, first = fit(workdir, max_steps=STEPS - 1, export=workdir / "export_step2", **sharded())
    first_trainer.save_checkpoint(checkpoint)
    export = workdir / "export_step3"
    trainer, resumed = fit(workdir, max_steps=STEPS, ckpt_path=checkpoint, export=export, **sharded())
    if trainer.is_global_zero:
        record = {
            "totals": first.totals | resumed.totals,
            "grads": first.grads,
            "weights": first.weights | resumed.weights,
            "resumed_steps": sorted(resumed.totals),
            "global_step": trainer.global_step,
        }
        torch.save(record, workdir / "sharded.pt")


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the models on disk, then both runs at once (the workers in the background, the reference here)


def scratch_tokenizer() -> PreTrainedTokenizerFast:
    """A two-token tokenizer: the module needs one, these runs feed token ids and never decode (no downloads)."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def save_models(workdir: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    """Random teacher and student folders (with a tokenizer), so both runs start from the very same weights."""
    torch.manual_seed(0)
    for name, fields in (("teacher", TEACHER), ("student", STUDENT)):
        config = dict(fields)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        model.save_pretrained(workdir / name)
        tokenizer.save_pretrained(workdir / name)
    return workdir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_models(tmp_path_factory.mktemp("fsdp"), scratch_tokenizer())


def launch_workers(workdir: Path) -> list[subprocess.Popen]:
    """Start the ranks as torchrun would: each gets its rank and the rendezvous address in its environment."""
    port, procs = free_port(), []
    for rank in range(WORLD):
        env = subprocess_env(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
            LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1",
        )  # fmt: skip
        with open(workdir / f"rank{rank}.log", "w") as log:  # the child keeps its own copy of the handle
            command = [sys.executable, __file__, str(workdir)]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_workers(procs: list[subprocess.Popen], workdir: Path) -> None:
    """Wait for every rank, at most WORKER_TIMEOUT_S; once one fails the others are stopped (they would wait on
    it in a collective). A failure shows each failed rank's log."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    failed = {rank: proc.returncode for rank, proc in enumerate(procs) if proc.returncode != 0}
    logs = "\n".join(
        f"rank {r} (exit {code}):\n{(workdir / f'rank{r}.log').read_text()[-3000:]}"
        for r, code in failed.items()
    )
    assert not failed, f"sharded run failed (or ran past {WORKER_TIMEOUT_S} s):\n{logs}"


@pytest.fixture(scope="module")
def runs(model_dir: Path) -> dict:
    procs = launch_workers(model_dir)
    try:
        _, single = fit(model_dir, devices=1, max_steps=STEPS, export=model_dir / "export_single")
    finally:
        wait_workers(procs, model_dir)
    return {
        "single": single,
        "sharded": torch.load(model_dir / "sharded.pt", weights_only=True),
        "dir": model_dir,
    }


def assert_states_close(actual: dict[str, Tensor], expected: dict[str, Tensor], **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=lambda m, n=name: f"{n}: {m}", **tolerance)


# ----------------------------------------------------------------------------------------------------------------
# Sharded training equals single-process training


def test_sharded_loss_equals_single_process(runs):
    single, sharded = runs["single"], runs["sharded"]
    for step in range(1, STEPS + 1):
        assert sharded["totals"][step] == pytest.approx(single.totals[step], rel=1e-5), f"step {step}"


def test_sharded_gradients_equal_single_process(runs):
    """Tied embedding/head, final norm (lens and KD gradients) and blocks, after token normalisation and clipping."""
    single, sharded = runs["single"].grads, runs["sharded"]["grads"]
    assert single.keys() == sharded.keys()
    for name, expected in single.items():
        scale = float(expected.abs().max())
        assert scale > 0, f"{name} has no gradient: the comparison would prove nothing"
        torch.testing.assert_close(sharded[name], expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_sharded_training_and_resume_equal_single_process(runs):
    """Weights after each step, the third trained after resuming from the sharded checkpoint (Adam state too)."""
    single, sharded = runs["single"], runs["sharded"]
    assert sharded["resumed_steps"] == [STEPS] and sharded["global_step"] == STEPS
    for step in range(1, STEPS + 1):
        assert_states_close(sharded["weights"][step], single.weights[step], rtol=1e-4, atol=1e-5)
    moved = max(
        float((single.weights[STEPS][k] - single.weights[1][k]).abs().max()) for k in single.weights[1]
    )
    assert moved > 1e-3, "the weights hardly changed: the comparison would prove nothing"


def test_single_process_run_equals_plain_pytorch(runs):
    """The reference of the sharded tests pinned to an independent value (tests/reference.py): every term on (CE 0.5,
    reverse KL 1, JSD lens 1, MSE 0.5 with its learned projection), clipped at CLIP, AdamW at a constant 1e-2."""
    single, folder = runs["single"], runs["dir"]
    student, teacher = (
        AutoModelForCausalLM.from_pretrained(folder / role) for role in ("student", "teacher")
    )
    projection = torch.nn.Linear(TEACHER["hidden_size"], STUDENT["hidden_size"], bias=False)
    projection.weight.data.copy_(single.projections[0])
    objective = Objective(
        ce_weight=0.5, mse_weight=0.5, projections=[projection], student_layers=[1], teacher_layers=[2]
    )
    batch = next(iter(DataLoader(rows(), batch_size=ROWS)))
    start = {name: value.clone() for name, value in student.state_dict().items()}
    with torch.no_grad():
        total = float(weighted(objective_sums(student, teacher, batch, objective), objective))
    assert single.totals[1] == pytest.approx(total, rel=1e-5)
    reference = train_reference(student, teacher, [[batch]] * STEPS, objective, [1e-2] * STEPS, weight_decay=0.01,
                                clip=CLIP)  # fmt: skip
    scale = CLIP / (grad_norm(reference[0].grads) + 1e-6)
    assert scale < 1, "clipping should act on the first step"
    for name, value in single.grads.items():  # as the optimizer used them: token mean, clipped
        expected = reference[0].grads[name] * scale
        torch.testing.assert_close(
            value, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()), msg=name
        )
    for step in range(1, STEPS + 1):
        difference = relative_difference(single.weights[step], reference[step - 1].weights, start)
        assert difference < 1e-3, (
            f"weights after step {step} off the reference by {difference:.3g} of the update"
        )


def test_sharded_checkpoint_holds_student_shards_only(runs):
    folder = runs["dir"] / "sharded.ckpt"
    assert folder.is_dir() and len(list(folder.glob("*.distcp"))) == WORLD
    keys = FileSystemReader(folder).read_metadata().state_dict_metadata.keys()
    weights = [k for k in keys if k.startswith("state_dict.")]
    assert any(".student.model.layers.1." in k for k in weights)
    assert not [k for k in weights if "teacher" in k], "the frozen teacher must stay out of checkpoints"


def test_sharded_export_is_one_hugging_face_folder(runs):
    folder = runs["dir"] / "export_step3"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied
    assert_states_close(student.state_dict(), runs["single"].weights[STEPS], rtol=1e-4, atol=1e-5)


def test_consolidated_checkpoint_exports(runs, tmp_path):
    """The documented path from a sharded checkpoint folder to `distillens export`."""
    single_file = tmp_path / "consolidated.ckpt"
    command = [sys.executable, "-m", "lightning.fabric.utilities.consolidate_checkpoint"]
    subprocess.run(
        [*command, str(runs["dir"] / "sharded.ckpt"), "--output_file", str(single_file)],
        check=True,
        env=subprocess_env(),
    )
    student = AutoModelForCausalLM.from_pretrained(export_checkpoint(single_file, tmp_path / "student"))
    assert_states_close(student.state_dict(), runs["single"].weights[STEPS - 1], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Configuration, precision and the lens-term switch (one process)


def test_fsdp_overlay_selects_fsdp2(monkeypatch):
    # imported here: the GPU check imports this file on machines without the CLI's packages
    from distillens.data import InstructionDataModule
    from distillens.lightning_cli import DistillensCLI

    monkeypatch.chdir(REPO)
    overlay = ["--config", "configs/tiny.yaml", "--config", "configs/trainer/fsdp.yaml"]
    two_processes = ["--trainer.devices", "2", "--trainer.logger", "false"]
    cli = DistillensCLI(DistillationModule, InstructionDataModule, args=[*overlay, *two_processes], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and strategy.num_processes == 2
    assert not strategy.sharding.offload_teacher and strategy.sharding.reshard_after_forward
    assert cli.trainer.precision == "32-true"  # the setup's (tiny.yaml) precision is kept


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_keeps_divergences_in_fp32(model_dir, precision):
    check_bf16(model_dir, precision, accelerator="cpu")


def check_bf16(model_dir: Path, precision: str, accelerator: str) -> None:
    """bf16 models (true) or bf16 compute (mixed), yet every loss term is fp32 and near the fp32 value."""
    device = "cuda" if accelerator == "gpu" else "cpu"
    reference = make_module(model_dir, mse_weight=0.0)
    reference.configure_model()
    module = make_module(model_dir, mse_weight=0.0)
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False)
    module.trainer = trainer
    module.configure_model()
    weights = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.student.dtype == module.teacher.dtype == weights
    module.to(device)
    module.teacher.to(device)
    batch = next(iter(DataLoader(rows(), batch_size=ROWS)))
    expected = reference(batch)
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    with trainer.precision_plugin.forward_context():
        terms = module(batch)
        terms.total().backward()
    for name in ("ce", "kd", "lens"):
        assert terms[name].dtype == torch.float32, f"{name} is {terms[name].dtype}"
        torch.testing.assert_close(terms[name].cpu(), expected[name].detach(), rtol=5e-2, atol=0.0, msg=name)
    grads = [p.grad for p in module.student.parameters()]
    assert all(g is not None and g.dtype == weights and torch.isfinite(g).all() for g in grads)


def test_naive_lens_impl_matches_chunked(model_dir):
    """The benchmark's variant (c): the same lens term and gradients, the published code's way."""
    results = {}
    for impl in ("chunked", "naive"):
        module = make_module(model_dir, mse_weight=0.0, lens_impl=impl, chunk_size=7)
        module.configure_model()
        terms = module(next(iter(DataLoader(rows(), batch_size=ROWS))))
        terms["lens"].backward()
        grads = {n: p.grad for n, p in module.student.named_parameters() if p.grad is not None}
        results[impl] = float(terms["lens"].detach()), grads
    assert results["naive"][0] == pytest.approx(results["chunked"][0], rel=1e-5)
    assert_states_close(results["naive"][1], results["chunked"][1], rtol=1e-4, atol=1e-7)


def test_unknown_lens_impl_is_rejected(model_dir):
    with pytest.raises(ValueError, match=r"lens_impl='fused'.*chunked, naive"):
        make_module(model_dir, lens_impl="fused")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
