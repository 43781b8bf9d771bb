"""`distillens diagnose`: lens diagnostics of any two models on a data file (the student a hub id, folder, `fit`
checkpoint or a layer subset of the teacher), with a checkpoint's own layer pairs, template and teacher adapter.
The computation and the figure are diagnostics.py's; this module loads what they compare."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import PreTrainedModel

from distillens.data import InstructionDataModule
from distillens.diagnostics import lens_diagnostics, save_lens_diagnostics
from distillens.export import student_and_checkpoint
from distillens.lens import LogitLens
from distillens.models import ModelSpec, check_same_vocabulary, load_model, load_tokenizer
from distillens.objective import LayerPairs

log = logging.getLogger(__name__)

LAYERS_PREFIX = "layers:"
"""A student spec `layers:0,6,29` is a fresh copy of those teacher blocks (a student before distillation)."""


def load_student(spec: str, teacher: PreTrainedModel) -> tuple[PreTrainedModel, dict[str, Any] | None]:
    """A student from a `distillens fit` checkpoint (.ckpt), `layers:i,j,...` of the teacher, or a model source,
    and the checkpoint if it came from one (its run's layer pairs and data settings)."""
    if spec.endswith(".ckpt"):
        student, checkpoint = student_and_checkpoint(spec)
        return student.float(), checkpoint  # compared with the fp32 teacher, whatever precision trained it
    if spec.startswith(LAYERS_PREFIX):
        text = spec.removeprefix(LAYERS_PREFIX)
        try:
            layers = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"student spec {spec!r}: expected layers:i,j,... with integer block indices"
            ) from None
        return load_model(ModelSpec(init_from_teacher_layers=layers), teacher=teacher), None
    return load_model(ModelSpec(source=spec)), None


def run_teacher_adapter(checkpoint: dict[str, Any] | None, teacher: str) -> str | None:
    """The adapter a checkpoint's run merged into its teacher, when ``teacher`` names that run's teacher (the same
    string or the same folder); None otherwise: another teacher is compared as it is."""
    run = ((checkpoint or {}).get("hyper_parameters") or {}).get("teacher") or {}
    adapter, source = run.get("adapter"), run.get("source")
    if adapter is None or source is None:
        return None
    same = source == teacher or (Path(source).exists() and Path(source).resolve() == Path(teacher).resolve())
    if same:
        log.info("teacher %s with the adapter its run merged, %s", teacher, adapter)
    return adapter if same else None


def diagnosed_pairs(
    student: LogitLens,
    teacher: LogitLens,
    checkpoint: dict[str, Any] | None,
    student_layers: list[int] | None,
    teacher_layers: list[int] | None,
    every_depth: bool,
) -> tuple[list[int], list[int]] | None:
    """The pairs `diagnose` compares: the ones asked for; else a checkpoint's, as its run trained with them (its
    layer pairs, resolved against its layer-subset student's copied blocks as training resolved them); else
    None, every depth at the same relative depth."""
    if every_depth and (student_layers or teacher_layers):
        raise ValueError("diagnose: give either every_depth or student_layers/teacher_layers, not both")
    if student_layers or teacher_layers:
        asked = LayerPairs(student=list(student_layers or []), teacher=list(teacher_layers or []))
        return asked.resolve(student.num_layers, teacher.num_layers)
    if every_depth or checkpoint is None:
        return None
    hparams = checkpoint.get("hyper_parameters", {})
    copied_from = (hparams.get("student") or {}).get("init_from_teacher_layers")
    trained = LayerPairs(**hparams.get("layers") or {})
    return trained.resolve(student.num_layers, teacher.num_layers, copied_from=copied_from)


def labelled_batches(data: str, tokenizer, **data_options: Any) -> Iterable[dict[str, Tensor]]:
    """Teacher-forced batches of a data file (any format the data module reads), through its validation path."""
    datamodule = InstructionDataModule(validation=data, **data_options)
    datamodule.connect(tokenizer)
    datamodule.setup("validate")
    return datamodule.val_dataloader()


def diagnose(
    teacher: str,
    student: str,
    data: str,
    out: str,
    *,
    teacher_adapter: str | None = None,
    divergence: str = "jsd",
    student_layers: list[int] | None = None,
    teacher_layers: list[int] | None = None,
    every_depth: bool = False,
    max_samples: int = 32,
    batch_size: int = 4,
    max_length: int = 512,
    max_prompt_length: int = 256,
    template: str | None = None,
    cache_dir: str = "data/cache",
) -> tuple[Path, Path]:
    """Lens diagnostics of a student against its teacher on a data file: lens_diagnostics.png and .json.

    Loads both models (see `load_student` for the student's forms), diagnoses them on `data` and writes the figure
    and the JSON. This signature is also `distillens diagnose`'s command line.

    Args:
        teacher: hub id, folder, .gguf file or smollm2-135m-instruct
        student: as teacher, a .ckpt, or layers:i,j,... of the teacher
        data: a data file or folder the data module reads
        out: folder for lens_diagnostics.png and .json
        teacher_adapter: a PEFT adapter merged into the teacher; unset: for a .ckpt whose run's teacher is
            --teacher, that teacher's own adapter (model.teacher.adapter), as the run trained against it
        divergence: divergence between lens distributions
        student_layers: student hidden-state indices to compare, paired with teacher_layers; unset: a .ckpt's
            own training pairs, else every depth
        teacher_layers: teacher hidden-state indices paired with student_layers
        every_depth: compare every student depth with the teacher's at the same relative depth, even for a .ckpt
        max_samples: examples to use (the first ones)
        batch_size: examples per forward pass
        max_length: longest prompt + response in tokens
        max_prompt_length: longest prompt in tokens (rows with longer prompts are dropped)
        template: alpaca, chat, or a string with {instruction}; unset: a .ckpt's training template, else alpaca
        cache_dir: folder for the tokenised data
    """
    # a checkpoint first: its run's teacher may have had an adapter, which the teacher measured against needs too
    loaded = student_and_checkpoint(student) if student.endswith(".ckpt") else None
    adapter = teacher_adapter or run_teacher_adapter(loaded[1] if loaded else None, teacher)
    teacher_spec = ModelSpec(source=teacher, adapter=adapter)
    teacher_model = load_model(teacher_spec)
    student_model, checkpoint = loaded or load_student(student, teacher_model)
    check_same_vocabulary(student_model, teacher_model)
    student_lens, teacher_lens = LogitLens(student_model), LogitLens(teacher_model)
    pairs = diagnosed_pairs(
        student_lens, teacher_lens, checkpoint, student_layers, teacher_layers, every_depth
    )
    trained_template = ((checkpoint or {}).get("datamodule_hyper_parameters") or {}).get("template")
    batches = labelled_batches(
        data, load_tokenizer(teacher_spec), max_samples=max_samples, batch_size=batch_size,
        max_length=max_length, max_prompt_length=max_prompt_length,
        template=template or trained_template or "alpaca", cache_dir=cache_dir,
    )  # fmt: skip
    report = lens_diagnostics(student_lens, teacher_lens, batches, divergence=divergence, pairs=pairs)
    return save_lens_diagnostics(report, out)
