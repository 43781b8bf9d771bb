"""Export a student from a `distillens fit` checkpoint, without building (or having) its teacher."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from distillens.models import ModelSpec, export_student, load_tokenizer

STUDENT_PREFIX = "student."


def student_from_checkpoint(checkpoint_path: str | Path) -> tuple[PreTrainedModel, dict]:
    """The student model of a checkpoint (architecture from its recorded config) and the checkpoint's hparams.

    The checkpoint is read with ``weights_only=True``: it holds tensors and plain values only.
    """
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "student_config" not in checkpoint:
        raise ValueError(f"{path}: not a distillens checkpoint (no student_config recorded)")
    config = dict(checkpoint["student_config"])
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    state = {
        k.removeprefix(STUDENT_PREFIX): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(STUDENT_PREFIX)
    }
    student.load_state_dict(state, strict=True)
    return student.eval(), checkpoint.get("hyper_parameters", {})


def tokenizer_from_hparams(hparams: dict):
    """The tokenizer a run used: the student's own source or tokenizer, else the teacher's."""
    for role in ("student", "teacher"):
        spec = hparams.get(role)
        if spec and (spec.get("tokenizer") or spec.get("source")):
            return load_tokenizer(ModelSpec(**spec))
    raise ValueError("the checkpoint's hyper-parameters name no tokenizer source for student or teacher")


def export_checkpoint(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write the checkpoint's student as a Hugging Face folder (safetensors + tokenizer)."""
    student, hparams = student_from_checkpoint(checkpoint_path)
    return export_student(student, tokenizer_from_hparams(hparams), out_dir)
