"""LoRA students and teacher adapters through PEFT, on tiny random Llama and Qwen2 models.

- The lens of a LoRA-wrapped student reads its real final norm and unembedding: the lens of the last layer is the
  wrapped model's logits, adapters included.
- At initialisation (every LoRA B = 0) the objective's terms equal those of the plain student.
- Only the adapters train and are checkpointed; a resumed run continues the uninterrupted one exactly.
- `distillens export` writes the merged model (a plain Hugging Face folder) by default, the adapter on request.
- A teacher adapter saved by PEFT is merged into the frozen teacher at load.
- DDP and FSDP2 over two gloo processes train the LoRA student as one process does (this file is also their
  worker: ``python tests/test_lora.py WORKDIR`` is one rank, with torchrun's variables in its environment).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from helpers import REPO, free_port, subprocess_env
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from distillens.callbacks import ExportStudent
from distillens.cli import main
from distillens.distributed import FSDP2Strategy
from distillens.export import export_checkpoint
from distillens.lens import LogitLens
from distillens.lightning_cli import run_cli
from distillens.lora import LoraSpec, add_lora, is_lora
from distillens.models import ModelSpec, load_model
from distillens.module import DistillationModule
from distillens.sharding import full_state_dict, is_sharded

WORLD = 2
ROWS, LENGTH, VOCAB = 4, 12, 256
WORKER_TIMEOUT_S = 240
LLAMA = dict(
    model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
)  # fmt: skip
STUDENT = dict(LLAMA, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
QWEN2 = dict(STUDENT, model_type="qwen2", tie_word_embeddings=False)
LORA = {"r": 4, "alpha": 16.0, "dropout": 0.0}  # no dropout: runs in different processes must agree exactly


# ----------------------------------------------------------------------------------------------------------------
# Models on disk, batches, runs


def scratch_tokenizer() -> PreTrainedTokenizerFast:
    """A two-token tokenizer: the module needs one; these runs feed token ids and never decode."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def random_model(fields: dict):
    config = dict(fields)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


def save_models(workdir: Path) -> Path:
    """Random teacher, students (Llama, Qwen2) and a teacher adapter saved by PEFT, with a tokenizer each."""
    torch.manual_seed(0)
    tokenizer = scratch_tokenizer()
    for name, fields in (("teacher", LLAMA), ("student", STUDENT), ("qwen2", QWEN2)):
        random_model(fields).save_pretrained(workdir / name)
        tokenizer.save_pretrained(workdir / name)
    adapted = add_lora(load_model(ModelSpec(source=str(workdir / "teacher"))), LoraSpec(**LORA))
    randomise_adapters(adapted)
    adapted.save_pretrained(workdir / "teacher_adapter")
    return workdir


def randomise_adapters(model: PeftModel, scale: float = 0.5) -> None:
    """Non-zero B matrices, so that the adapters change what the model computes."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)


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


def batch() -> dict[str, Tensor]:
    return {key: torch.stack([row[key] for row in rows()]) for key in rows()[0]}


def make_module(
    workdir: Path, *, lora: dict | None = LORA, student: str | Path = "student"
) -> DistillationModule:
    """Every term on (CE, final-layer KD, lens); constant learning rate, so runs of any length agree."""
    return DistillationModule(
        student=ModelSpec(source=str(workdir / student), lora=lora),
        teacher=ModelSpec(source=str(workdir / "teacher"), adapter=str(workdir / "teacher_adapter")),
        loss={"ce_weight": 0.5},
        layers={"student": [1], "teacher": [2]},
        optimizer={"lr": 1e-2, "warmup": 0, "min_lr_ratio": 1.0},
    )


class Recorder(L.Callback):
    """After each optimizer step: the objective's token sum over all ranks and the full student weights."""

    def __init__(self) -> None:
        self.totals: dict[int, float] = {}
        self.weights: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        self.totals[step] = float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="sum"))
        student = pl_module.student
        state = full_state_dict(student) if is_sharded(student) else student.state_dict()
        self.weights[step] = {name: value.detach().clone() for name, value in state.items()}


def fit(
    workdir: Path,
    *,
    max_steps: int,
    devices: int = 1,
    ckpt_path: Path | None = None,
    export: Path | None = None,
    lora: dict | None = LORA,
    student: str | Path = "student",
    **trainer_options,
) -> tuple[L.Trainer, Recorder, DistillationModule]:
    """Train on the four rows, one batch per step (all rows in one process, half of them per rank of two)."""
    L.seed_everything(0, verbose=False)
    recorder = Recorder()
    callbacks = [recorder] + ([ExportStudent(str(export))] if export else [])
    trainer = L.Trainer(
        devices=devices, max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **{"accelerator": "cpu", **trainer_options},
    )  # fmt: skip
    module = make_module(workdir, lora=lora, student=student)
    trainer.fit(module, DataLoader(rows(), batch_size=ROWS // devices), ckpt_path=ckpt_path)
    return trainer, recorder, module


def logits(model, input_ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids).logits  # (B, T, V)


def sample_ids() -> Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))  # (B, T)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_models(tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def runs(model_dir: Path) -> dict:
    """Uninterrupted 3 steps; 2 steps + checkpoint, then resumed to 3; a full fine-tune's 2-step checkpoint."""
    _, whole, whole_module = fit(model_dir, max_steps=3, export=model_dir / "export_fit")
    first_trainer, first, _ = fit(model_dir, max_steps=2)
    first_trainer.save_checkpoint(model_dir / "lora.ckpt")
    _, resumed, _ = fit(model_dir, max_steps=3, ckpt_path=model_dir / "lora.ckpt")
    full_trainer, _, _ = fit(model_dir, max_steps=2, lora=None)
    full_trainer.save_checkpoint(model_dir / "full.ckpt")
    return {"whole": whole, "module": whole_module, "first": first, "resumed": resumed, "dir": model_dir}


# ----------------------------------------------------------------------------------------------------------------
# The lens and the objective see the wrapped student


@pytest.mark.parametrize("family", ["student", "qwen2"])
@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_lens_of_the_last_layer_is_the_wrapped_students_logits(model_dir, family, targets):
    base = load_model(ModelSpec(source=str(model_dir / family)))
    wrapped = add_lora(
        load_model(ModelSpec(source=str(model_dir / family))), LoraSpec(target_modules=targets)
    )
    randomise_adapters(wrapped)
    lens, ids = LogitLens(wrapped), sample_ids()
    assert lens.norm is wrapped.get_base_model().model.norm
    with torch.no_grad(), lens.capture([lens.num_layers]) as hidden:
        expected = wrapped.eval()(input_ids=ids).logits  # (B, T, V)
    torch.testing.assert_close(lens.logits(hidden[lens.num_layers]), expected)
    assert (expected - logits(base, ids)).abs().max() > 1e-2, "the adapters changed nothing: the test is void"


def test_peft_default_targets_per_family(model_dir):
    wrapped = add_lora(load_model(ModelSpec(source=str(model_dir / "qwen2"))), LoraSpec())
    adapted = {
        name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")
    }
    assert adapted == {"q_proj", "v_proj"}  # PEFT's choice for Llama/Qwen2 when target_modules is omitted
    config = wrapped.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32.0, 0.1)  # the paper's Qwen values


def test_lora_student_at_initialisation_equals_the_plain_student(model_dir):
    plain, lora = make_module(model_dir, lora=None), make_module(model_dir, lora=LORA)
    for module in (plain, lora):
        module.configure_model()
        module.train()
    assert is_lora(lora.student) and not is_lora(plain.student)
    zero_b = [p for n, p in lora.student.named_parameters() if "lora_B" in n]
    assert zero_b and all(float(p.detach().abs().max()) == 0.0 for p in zero_b)
    expected, actual = plain(batch()), lora(batch())
    assert {"ce", "kd", "lens", "lens/s1_t2", "tokens"} <= expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name)
    # the lens view of each layer too, on the student's own hidden states
    ids = sample_ids()
    views = []
    for module in (plain, lora):
        lens = LogitLens(module.student)
        with torch.no_grad(), lens.capture([1, 2]) as hidden:
            module.student(input_ids=ids)
        views.append(torch.stack([lens.logits(hidden[i]) for i in (1, 2)]))  # (2, B, T, V)
    torch.testing.assert_close(views[1], views[0])


def test_teacher_adapter_is_merged_at_load(model_dir):
    teacher = load_model(
        ModelSpec(source=str(model_dir / "teacher"), adapter=str(model_dir / "teacher_adapter"))
    )
    assert not is_lora(teacher), "the adapter must be merged into plain weights"
    base = load_model(ModelSpec(source=str(model_dir / "teacher")))
    wrapped = PeftModel.from_pretrained(base, model_dir / "teacher_adapter")
    ids = sample_ids()
    torch.testing.assert_close(logits(teacher, ids), logits(wrapped, ids))
    plain = load_model(ModelSpec(source=str(model_dir / "teacher")))
    assert (logits(teacher, ids) - logits(plain, ids)).abs().max() > 1e-2


def test_bad_lora_and_adapter_settings_are_one_clear_line(model_dir, tmp_path):
    with pytest.raises(ValueError, match="model.teacher.lora: the teacher is frozen"):
        DistillationModule(
            student=ModelSpec(source=str(model_dir / "student")),
            teacher=ModelSpec(source=str(model_dir / "teacher"), lora=LORA),
        )
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_model(ModelSpec(source=str(model_dir / "teacher"), adapter=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model(ModelSpec(source=str(model_dir / "teacher"), adapter=str(tmp_path / "missing/")))
    with pytest.raises(ValueError, match="lora.target_modules=\\['nowhere'\\]"):
        add_lora(
            load_model(ModelSpec(source=str(model_dir / "student"))), LoraSpec(target_modules=["nowhere"])
        )
    with pytest.raises(ValueError, match="model.student.lora.r=0: must be >= 1"):
        LoraSpec(r=0)


@pytest.mark.parametrize(("field", "value"), [("r", 0), ("alpha", 0.0), ("dropout", 1.0), ("dropout", -0.1)])
def test_a_lora_value_out_of_range_names_its_setting_alone(field, value):
    """The line names the setting (model.student.lora.<field>) and the value at fault, not the others."""
    with pytest.raises(ValueError) as raised:
        LoraSpec(**{field: value})
    message = str(raised.value)
    assert message.startswith(f"model.student.lora.{field}={value}: "), message
    others = {"r", "alpha", "dropout"} - {field}
    assert not any(f"{other}=" in message for other in others), message


def test_a_single_target_name_adapts_the_layers_it_names(model_dir):
    """target_modules: q_proj (a string, as `--model.student.lora.target_modules q_proj` gives) is one name,
    like [q_proj]; "all-linear" keeps its meaning."""
    student = ModelSpec(source=str(model_dir / "student"))
    for targets in ("q_proj", ["q_proj"]):
        wrapped = add_lora(load_model(student), LoraSpec(target_modules=targets))
        adapted = {
            name.rsplit(".", 1)[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")
        }
        assert adapted == {"q_proj"}, targets


def test_an_adapter_of_another_base_is_one_line_naming_it(model_dir, tmp_path):
    """The student's adapter (hidden size 32) on the teacher (64): one ValueError naming the adapter and the
    model, not PEFT's size-mismatch traceback."""
    adapted = add_lora(load_model(ModelSpec(source=str(model_dir / "student"))), LoraSpec(**LORA))
    adapted.save_pretrained(tmp_path / "student_adapter")
    spec = ModelSpec(source=str(model_dir / "teacher"), adapter=str(tmp_path / "student_adapter"))
    with pytest.raises(ValueError) as raised:
        load_model(spec)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "student_adapter") in message, message
    assert "another base model" in message and "LlamaForCausalLM" in message, message


def test_a_malformed_adapter_config_is_one_line_naming_the_file(model_dir, tmp_path):
    folder = tmp_path / "broken_adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{\n")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'adapter_config.json'}: not valid JSON")):
        load_model(ModelSpec(source=str(model_dir / "teacher"), adapter=str(folder)))


def test_diagnose_of_a_run_whose_teacher_had_an_adapter_merges_it(model_dir, tmp_path, monkeypatch):
    """`diagnose --teacher <the run's teacher> --student run.ckpt` measures against the teacher the run trained
    with, its adapter merged, not the plain base (which differs: test_teacher_adapter_is_merged_at_load)."""
    import distillens.diagnose as diagnose

    module = make_module(model_dir, lora=None)
    module.configure_model()
    checkpoint = tmp_path / "run.ckpt"
    torch.save(
        {
            "student_config": module.student.config.to_dict(),
            "hyper_parameters": dict(module.hparams),
            "state_dict": module.state_dict(),
        },
        checkpoint,
    )
    teachers = []

    class Stop(Exception):
        pass

    def measured(student, teacher, batches, **options):
        teachers.append(teacher.model)
        raise Stop

    monkeypatch.setattr(diagnose, "labelled_batches", lambda *args, **kwargs: [])
    monkeypatch.setattr(diagnose, "lens_diagnostics", measured)
    with pytest.raises(Stop):
        diagnose.diagnose(str(model_dir / "teacher"), str(checkpoint), "unused", str(tmp_path / "out"))
    want = load_model(
        ModelSpec(source=str(model_dir / "teacher"), adapter=str(model_dir / "teacher_adapter"))
    )
    ids = sample_ids()
    torch.testing.assert_close(logits(teachers[0], ids), logits(want, ids))


# ----------------------------------------------------------------------------------------------------------------
# Training, checkpoints, resume, export


def test_only_the_adapters_train(runs):
    module, whole = runs["module"], runs["whole"]
    trainable = {name for name, p in module.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimised = sum(p.numel() for group in module.trainer.optimizers[0].param_groups for p in group["params"])
    assert optimised == sum(p.numel() for p in module.student.parameters() if p.requires_grad)
    start, end = whole.weights[1], whole.weights[3]
    moved = {name for name in start if not torch.equal(start[name], end[name])}
    assert moved and moved <= {f"{name}" for name in trainable}, sorted(moved - trainable)[:3]


def test_checkpoint_holds_the_adapters_only(runs):
    state = torch.load(runs["dir"] / "lora.ckpt", weights_only=True)["state_dict"]
    assert state and all("lora_" in key for key in state), [k for k in state if "lora_" not in k][:3]
    full = torch.load(runs["dir"] / "full.ckpt", weights_only=True)["state_dict"]
    lora_bytes, full_bytes = ((runs["dir"] / name).stat().st_size for name in ("lora.ckpt", "full.ckpt"))
    assert lora_bytes < full_bytes / 2, (lora_bytes, full_bytes)
    assert len(state) < len(full)


def test_resumed_lora_run_continues_the_uninterrupted_one(runs):
    whole, resumed = runs["whole"], runs["resumed"]
    assert sorted(resumed.totals) == [3]
    assert resumed.totals[3] == pytest.approx(whole.totals[3], rel=1e-6)
    for name, value in whole.weights[3].items():
        torch.testing.assert_close(resumed.weights[3][name], value, msg=name)


def test_resumed_lora_run_with_dropout_continues_the_uninterrupted_one(runs):
    """With the default dropout (0.1) the masks of step 3 must be those the uninterrupted run drew, whatever drew
    random numbers in between (the data loader starting an epoch, the restart itself)."""
    lora = dict(LORA, dropout=0.1)
    _, whole, _ = fit(runs["dir"], max_steps=3, lora=lora)
    first_trainer, _, _ = fit(runs["dir"], max_steps=2, lora=lora)
    first_trainer.save_checkpoint(runs["dir"] / "dropout.ckpt")
    _, resumed, _ = fit(runs["dir"], max_steps=3, lora=lora, ckpt_path=runs["dir"] / "dropout.ckpt")
    assert whole.totals[3] != pytest.approx(runs["whole"].totals[3], rel=1e-6), "dropout changed nothing"
    assert resumed.totals[3] == pytest.approx(whole.totals[3], rel=1e-6)
    for name, value in whole.weights[3].items():
        torch.testing.assert_close(resumed.weights[3][name], value, msg=name)


@pytest.mark.parametrize("change", ["same shape", "another shape"])
def test_a_changed_lora_base_is_refused_in_one_line(change, model_dir, tmp_path):
    """A LoRA checkpoint holds the adapters only, and its base comes from the student's source again: when the
    weights there are no longer those the adapters were trained on, resume and export stop, naming the source."""
    base = tmp_path / "base"
    random_model(STUDENT).save_pretrained(base)
    scratch_tokenizer().save_pretrained(base)
    trainer, _, _ = fit(model_dir, max_steps=1, student=base)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    fields = STUDENT if change == "same shape" else dict(STUDENT, hidden_size=48)
    random_model(fields).save_pretrained(base)  # other weights in the same folder
    line = (
        f"run.ckpt: its LoRA adapters were trained on other base weights than model.student.source '{base}' "
    )
    with pytest.raises(ValueError, match=line) as refused:
        fit(model_dir, max_steps=2, student=base, ckpt_path=tmp_path / "run.ckpt")
    assert len(str(refused.value).splitlines()) == 1
    with pytest.raises(ValueError, match=line):
        export_checkpoint(tmp_path / "run.ckpt", tmp_path / "out")


def test_end_of_fit_export_is_the_merged_student(runs):
    exported = AutoModelForCausalLM.from_pretrained(runs["dir"] / "export_fit")
    assert not (runs["dir"] / "export_fit" / "adapter_config.json").exists()
    ids = sample_ids()
    torch.testing.assert_close(
        logits(exported, ids), logits(runs["module"].student, ids), rtol=1e-5, atol=1e-5
    )


def test_export_command_merges_by_default_and_writes_the_adapter_on_request(runs, tmp_path, capsys):
    model_dir, checkpoint, ids = runs["dir"], str(runs["dir"] / "lora.ckpt"), sample_ids()
    restored = DistillationModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    expected = logits(restored.student, ids)
    main(["export", checkpoint, str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, ids), expected, rtol=1e-5, atol=1e-5)
    main(["export", checkpoint, str(tmp_path / "adapter"), "--adapter-only"])
    assert "exported" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    base = load_model(ModelSpec(source=str(model_dir / "student")))
    adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(adapter, ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_both_exports_of_a_bf16_true_run_are_the_same_model(lora, model_dir, tmp_path):
    """The end-of-fit export and `distillens export` of the run's checkpoint: same dtype, same tensors."""
    trainer, _, _ = fit(
        model_dir, max_steps=2, export=tmp_path / "at_fit_end", lora=lora, precision="bf16-true"
    )  # fmt: skip
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    main(["export", str(tmp_path / "run.ckpt"), str(tmp_path / "from_checkpoint")])
    at_fit_end = load_file(tmp_path / "at_fit_end" / "model.safetensors")
    from_checkpoint = load_file(tmp_path / "from_checkpoint" / "model.safetensors")
    assert at_fit_end.keys() == from_checkpoint.keys()
    for name, tensor in at_fit_end.items():
        assert tensor.dtype == from_checkpoint[name].dtype == torch.bfloat16, name
        assert torch.equal(tensor, from_checkpoint[name]), name


def test_adapter_only_export_of_a_full_student_is_refused(runs, tmp_path):
    with pytest.raises(ValueError, match="adapter_only: this student has no LoRA adapter"):
        export_checkpoint(runs["dir"] / "full.ckpt", tmp_path / "out", adapter_only=True)


def with_student(checkpoint: Path, student: dict, out: Path) -> Path:
    """A copy of ``checkpoint`` whose hyper-parameters record the ``student`` settings."""
    saved = torch.load(checkpoint, weights_only=True)
    saved["hyper_parameters"]["student"] = student
    torch.save(saved, out)
    return out


UNNAMED_BASES = {
    "layer subset": {"init_from_teacher_layers": [0, 1]},
    "random config": {"config": STUDENT},
    "merged adapter": {"source": "SOURCE", "adapter": "ADAPTER"},
    "gguf": {"source": "model.Q4_1.gguf"},
}


@pytest.mark.parametrize("base", UNNAMED_BASES)
def test_adapter_only_export_is_refused_where_no_name_loads_the_base(base, runs, tmp_path):
    """PEFT loads an adapter folder onto the model its adapter_config.json names: a layer-subset student's named
    the whole teacher (logits off by 0.85), a random one's named none, and one whose source had an adapter merged
    in named the source without it. Refused by export and, when fit starts, by ExportStudent."""
    from types import SimpleNamespace

    fields = {k: str(runs["dir"] / "student") if v == "SOURCE" else v for k, v in UNNAMED_BASES[base].items()}
    fields = {k: str(runs["dir"] / "teacher_adapter") if v == "ADAPTER" else v for k, v in fields.items()}
    student = {**fields, "lora": LORA}
    checkpoint = with_student(runs["dir"] / "lora.ckpt", student, tmp_path / "run.ckpt")
    refusal = "adapter_only: .*, which no model name loads, so the adapter alone cannot be used"
    with pytest.raises(ValueError, match=refusal):
        export_checkpoint(checkpoint, tmp_path / "out", adapter_only=True)
    assert not (tmp_path / "out").exists()
    module = SimpleNamespace(student_spec=ModelSpec(**student))
    with pytest.raises(ValueError, match=refusal):
        ExportStudent(str(tmp_path / "out"), adapter_only=True).on_fit_start(None, module)


def test_adapter_only_export_names_the_base_by_an_absolute_path(runs, tmp_path, monkeypatch):
    """A student whose source was a relative folder: the adapter names that folder wherever it is loaded from."""
    monkeypatch.chdir(runs["dir"])
    checkpoint = with_student(
        runs["dir"] / "lora.ckpt", {"source": "student", "lora": LORA}, tmp_path / "run.ckpt"
    )
    export_checkpoint(checkpoint, tmp_path / "adapter", adapter_only=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(runs["dir"] / "student")
    monkeypatch.chdir(tmp_path)
    ids = sample_ids()
    restored = DistillationModule.load_from_checkpoint(runs["dir"] / "lora.ckpt", map_location="cpu")
    adapted = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(logits(adapted, ids), logits(restored.student, ids), rtol=1e-5, atol=1e-5)


def test_cli_fits_a_lora_student_exports_it_both_ways_and_tests_under_the_protocol(tmp_path, capsys):
    """The user's path: configs/tiny.yaml with model.student.lora, `distillens export` (merged, --adapter-only),
    `distillens test` under the evaluation protocol. The tiny student comes from a random config, so its checkpoint
    keeps the base weights (nothing could rebuild them) and the export builds the student from the checkpoint."""
    data = REPO / "data" / "instructions"
    args = [
        "--config", str(REPO / "configs" / "tiny.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_test_batches", "1", "--model.student.lora", "{r: 4, alpha: 8.0, dropout: 0.0}",
        "--model.generation.seeds", "[10]", "--model.generation.no_repeat_ngram_size", "6",
        "--data.train", str(data / "train.jsonl"), "--data.validation", str(data / "validation.jsonl"),
        "--data.test", str(data / "test.jsonl"), "--data.min_reference_tokens", "{instructions: 11}",
        "--data.cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    with mock.patch.object(sys, "argv", ["distillens"]):
        fitted = run_cli(["fit", *args])
    student, run = fitted.model.student, tmp_path / "tiny"
    assert is_lora(student)
    checkpoint = run / "checkpoints" / "last.ckpt"
    main(["export", str(checkpoint), str(tmp_path / "merged")])
    ids = sample_ids()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged, ids), logits(student, ids), rtol=1e-5, atol=1e-5)
    assert "student exported" in capsys.readouterr().out  # by fit's end and the merged export
    with pytest.raises(SystemExit) as refused:  # a random student's adapter is of no use without its base
        main(["export", str(checkpoint), str(tmp_path / "adapter"), "--adapter-only"])
    assert refused.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        "distillens: error: adapter_only: its base is a randomly initialised model.student.config"
    )
    with mock.patch.object(sys, "argv", ["distillens"]):
        run_cli(["test", *args, "--ckpt_path", str(checkpoint)])
    protocol = (run / "test-0" / "eval" / "results.md").read_text().splitlines()[-1]
    assert (
        "no_repeat_ngram_size 6" in protocol and "instructions: references of at least 11 tokens" in protocol
    )


# ----------------------------------------------------------------------------------------------------------------
# DDP and FSDP2 over two gloo processes


def worker(workdir: Path) -> None:
    """One rank: DDP 2 steps + checkpoint, DDP resumed to step 3, then FSDP2 3 steps; rank 0 saves the record."""
    ddp_trainer, ddp, _ = fit(workdir, max_steps=2, devices=WORLD, strategy="ddp")
    ddp_trainer.save_checkpoint(workdir / "ddp.ckpt")
    _, ddp_resumed, _ = fit(
        workdir, max_steps=3, devices=WORLD, strategy="ddp", ckpt_path=workdir / "ddp.ckpt"
    )
    trainer, sharded, _ = fit(
        workdir, max_steps=3, devices=WORLD, strategy=FSDP2Strategy(), export=workdir / "export_fsdp"
    )
    if trainer.is_global_zero:
        record = {
            "ddp": {"totals": ddp.totals | ddp_resumed.totals, "weights": ddp.weights | ddp_resumed.weights},
            "fsdp": {"totals": sharded.totals, "weights": sharded.weights},
        }
        torch.save(record, workdir / "distributed.pt")


@pytest.fixture(scope="module")
def distributed(model_dir: Path, runs: dict) -> dict:
    """Both ranks started as torchrun would start them; the single-process reference is `runs["whole"]`."""
    port, procs = free_port(), []
    for rank in range(WORLD):
        env = subprocess_env(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
            LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1",
        )  # fmt: skip
        with open(model_dir / f"rank{rank}.log", "w") as log:
            command = [sys.executable, __file__, str(model_dir)]
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    logs = "\n".join(
        f"rank {rank}:\n{(model_dir / f'rank{rank}.log').read_text()[-3000:]}"
        for rank, proc in enumerate(procs)
        if proc.returncode != 0
    )
    assert not logs, f"distributed LoRA run failed (or ran past {WORKER_TIMEOUT_S} s):\n{logs}"
    return torch.load(model_dir / "distributed.pt", weights_only=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_lora_training_equals_one_process(distributed, runs, strategy):
    """Losses and adapter weights after each step (DDP's third step after resuming from its checkpoint)."""
    single, run = runs["whole"], distributed[strategy]
    for step in (1, 2, 3):
        assert run["totals"][step] == pytest.approx(single.totals[step], rel=1e-5), f"step {step}"
        assert run["weights"][step].keys() == single.weights[step].keys()
        for name, value in single.weights[step].items():
            torch.testing.assert_close(run["weights"][step][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_lora_export_is_the_merged_student(distributed, runs):
    exported = AutoModelForCausalLM.from_pretrained(runs["dir"] / "export_fsdp")
    expected = AutoModelForCausalLM.from_pretrained(runs["dir"] / "export_fit")
    ids = sample_ids()
    torch.testing.assert_close(logits(exported, ids), logits(expected, ids), rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
