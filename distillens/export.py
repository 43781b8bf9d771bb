"""Export a student from a `distillens fit` checkpoint, without building (or having) its teacher, or from a trained
module at the end of fit (a sharded student gathered into an ordinary copy first, `consolidated_model`).

A LoRA student's checkpoint holds its adapters only: the export rebuilds the student from its recorded source
(which must be reachable again: a folder, or a hub id in the cache), loads the adapters into it, and writes the
merged model (a plain Hugging Face folder) or, on request, the adapter folder alone.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from distillens.checkpoints import load_checkpoint
from distillens.data.templates import chat_template_for
from distillens.hub import replace_folder
from distillens.lora import (
    LoraSpec,
    add_lora,
    check_lora_base,
    frozen_parameters,
    is_lora,
    merged_copy,
    weights_fingerprint,
)
from distillens.models import (
    DEFAULT_TEACHER,
    ModelSpec,
    default_teacher_dir,
    load_model,
    load_tokenizer,
    lora_base_description,
)
from distillens.sharding import full_state_dict, is_sharded

log = logging.getLogger(__name__)

STUDENT_PREFIX = "student."


EXPORT_MARKERS = ("config.json", "adapter_config.json")
"""Files every export writes (a merged model, or an adapter folder): a folder holding one holds an earlier export."""
EXPORT_FILES = (
    *EXPORT_MARKERS,
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",  # a model saved in shards, and their index
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
"""Names (fnmatch patterns) of the files `export_student` writes, for any model family and tokenizer."""
ADAPTER_MODEL_CARD = "README.md"  # the model card PEFT writes into an adapter folder


def check_export_folder(folder: str | Path, overwrite: bool) -> None:
    """A non-empty folder is written only when asked (``overwrite``), and then only if it holds an earlier
    export and nothing else: its files are replaced as a whole, so no other file is ever deleted with them."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"export folder {folder} is a file")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"export folder {folder} is not empty; choose a new folder, or replace its earlier export with "
            "--overwrite (distillens export) or overwrite: true (ExportStudent)"
        )
    if not any((folder / name).is_file() for name in EXPORT_MARKERS):
        raise FileExistsError(
            f"export folder {folder} holds no earlier export (no {' or '.join(EXPORT_MARKERS)}); refusing to "
            "replace its files: choose another folder"
        )
    others = sorted(path.name for path in folder.iterdir() if not _written_by_export(path))
    if others:
        listed = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise FileExistsError(
            f"export folder {folder} holds {listed}, not written by an export; --overwrite replaces the folder "
            "as a whole, so move them out first or choose another folder"
        )


def _written_by_export(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    if path.name == ADAPTER_MODEL_CARD:
        return (path.parent / "adapter_config.json").is_file()
    return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in EXPORT_FILES)


def export_student(
    model: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    *,
    adapter_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Save model (safetensors), config, generation config and tokenizer where `from_pretrained` can load them.

    A LoRA student is saved merged (adapters folded into a copy of the weights: a plain Hugging Face model that
    needs neither PEFT nor the base), or, with ``adapter_only``, as its adapter folder alone (adapter_config.json
    and the adapter weights, which ``PeftModel.from_pretrained(base, folder)`` or ``ModelSpec.adapter`` load).
    A non-empty folder is refused unless ``overwrite`` (see `check_export_folder`); the new export is written
    beside it and then takes its place, so no file of the earlier one is left mixed in.
    """
    if adapter_only and not is_lora(model):
        raise ValueError(
            "adapter_only: this student has no LoRA adapter (it was trained without model.student.lora)"
        )
    folder = Path(folder)
    check_export_folder(folder, overwrite)
    if is_lora(model) and not adapter_only:
        model = merged_copy(model)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    if folder.is_dir() and any(folder.iterdir()):
        replace_folder(folder, write)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
    return folder


def consolidated_model(model: PreTrainedModel) -> PreTrainedModel | None:
    """An ordinary copy of a sharded model on rank 0 (None on the others); an unsharded model is returned as is.

    Gathering is a collective, so every rank must call this. The copy is built from the model's config and holds
    the gathered weights in their trained dtype, ready for ``save_pretrained``; a LoRA student's copy is wrapped in
    the same adapters (merged or saved alone by ``export_student``).
    """
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    if not state:
        return None
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype)
    plain.generation_config = copy.deepcopy(model.generation_config)
    if is_lora(model):
        plain = add_lora(plain, model.peft_config["default"])
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def student_and_checkpoint(
    checkpoint_path: str | Path, *, keep_adapter: bool = False
) -> tuple[PreTrainedModel | PeftModel, dict]:
    """The student model of a checkpoint and the checkpoint itself (its hparams, its data module's hparams).

    A full student is built from the architecture the checkpoint records; a LoRA student from its source plus the
    checkpoint's adapters, returned merged (a plain model) unless ``keep_adapter``. The checkpoint is read with
    ``weights_only=True``: it holds tensors and plain values only. The student is rebuilt in the dtype its
    checkpoint holds (bf16 after a ``bf16-true`` run), as training ran it: a LoRA base is then the one the adapters
    were trained on, fingerprint included, and the merge rounds as the end-of-fit export's did.
    """
    path = Path(checkpoint_path)
    checkpoint = load_checkpoint(path)
    if "student_config" not in checkpoint:
        raise ValueError(f"{path}: not a distillens checkpoint (no student_config recorded)")
    hparams = checkpoint.get("hyper_parameters", {})
    state = {
        k.removeprefix(STUDENT_PREFIX): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith(STUDENT_PREFIX)
    }
    dtype = trained_dtype(state)
    if (hparams.get("student") or {}).get("lora") is None:
        config = dict(checkpoint["student_config"])
        student = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        student.to(dtype).load_state_dict(state, strict=True)
        return student.eval(), checkpoint
    if any("lora_" not in key for key in state):  # base weights saved too (a student from a random config)
        student = _student_from_config(checkpoint["student_config"], hparams["student"]["lora"])
        student.to(dtype).load_state_dict(state, strict=True)
    else:
        student = _lora_student(checkpoint, state, path, dtype)
    return (student if keep_adapter else merged_copy(student)).eval(), checkpoint


def trained_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype a checkpoint's student weights are in: the one its run trained them in."""
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def _student_from_config(config: dict, lora: dict) -> PeftModel:
    config = dict(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    return add_lora(model, LoraSpec(**lora))


def _lora_student(
    checkpoint: dict, adapters: dict[str, torch.Tensor], path: Path, dtype: torch.dtype
) -> PeftModel:
    """The student rebuilt from its source (and teacher, for a layer subset) in ``dtype``, with the checkpoint's
    adapters, once the rebuilt base is known to be the one they were trained on.

    It lives here rather than in ``lora.py``: rebuilding the source needs ``models``, a layer above ``lora``
    (which ``models`` itself imports)."""
    hparams = checkpoint.get("hyper_parameters", {})
    spec = ModelSpec(**hparams["student"])
    teacher_spec = hparams.get("teacher")
    teacher = (
        load_model(ModelSpec(**teacher_spec))
        if spec.init_from_teacher_layers is not None and teacher_spec
        else None
    )
    student = load_model(spec, teacher=teacher).to(dtype)
    base = lora_base_description(spec, ModelSpec(**teacher_spec) if teacher_spec else None)
    check_lora_base(path, checkpoint, weights_fingerprint(frozen_parameters(student)), base)
    try:
        missing, unexpected = student.load_state_dict(adapters, strict=False)
    except RuntimeError as error:  # a checkpoint without a fingerprint, on a base of another shape
        reason = str(error).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{path}: its adapters do not fit the student rebuilt from {base} ({reason})"
        ) from None
    frozen = {name for name, p in student.named_parameters(remove_duplicate=False) if not p.requires_grad}
    wrong = sorted(unexpected) + sorted(set(missing) - frozen)
    if wrong:
        raise ValueError(f"{path}: its adapters do not fit the student rebuilt from its source ({wrong[:3]})")
    return student


def tokenizer_from_hparams(hparams: dict):
    """The tokenizer a run used: the student's own source or tokenizer, else the teacher's."""
    for role in ("student", "teacher"):
        spec = hparams.get(role)
        if spec and (spec.get("tokenizer") or spec.get("source")):
            return load_tokenizer(ModelSpec(**spec))
    raise ValueError("the checkpoint's hyper-parameters name no tokenizer source for student or teacher")


def export_checkpoint(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    adapter_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """A Hugging Face folder (safetensors, config, tokenizer) of the student of any `distillens fit` checkpoint.

    The folder holds the merged model by default; with ``adapter_only``, a LoRA student's adapter folder alone.
    Its tokenizer's chat template renders the prompts the student was trained on (the run's data.template, which
    the checkpoint records), and config.json records that template as ``distillens_prompt_template``.

    Args:
        checkpoint_path: a .ckpt written by `distillens fit`
        out_dir: folder to write (safetensors, config, tokenizer); it must be new or empty unless --overwrite
        adapter_only: for a LoRA student: write its adapter folder alone instead of the merged model (the default)
        overwrite: replace the earlier export in a non-empty out_dir (a folder holding anything else is refused)
    """
    check_export_folder(out_dir, overwrite)  # before the (slow) rebuild of the student
    spec = None
    if adapter_only:  # the settings alone say whether the adapter can be used without the student
        hparams = load_checkpoint(checkpoint_path, mmap=True).get("hyper_parameters") or {}
        spec = ModelSpec(**hparams["student"]) if hparams.get("student") else None
        if spec is not None:
            adapter_base(spec)
    student, checkpoint = student_and_checkpoint(checkpoint_path, keep_adapter=adapter_only)
    template = (checkpoint.get("datamodule_hyper_parameters") or {}).get("template")
    if template is None:
        log.warning(
            "%s records no data template (no data module's hyper-parameters): the tokenizer's own chat template "
            "is exported, which may not be the prompt format the student was trained on",
            checkpoint_path,
        )
    tokenizer = tokenizer_from_hparams(checkpoint.get("hyper_parameters", {}))
    return export_trained_student(
        student, tokenizer, out_dir, template=template, adapter_only=adapter_only, overwrite=overwrite,
        student_spec=spec,
    )  # fmt: skip


def adapter_base(spec: ModelSpec) -> tuple[str, str | None]:
    """The base an adapter-only export names (``base_model_name_or_path``, revision): the folder (absolute) or hub
    id the student's base weights are loaded from. One line where the adapter alone cannot be used, as no name
    gives its base: a layer subset of the teacher (PEFT would load the adapter onto the whole teacher), a random
    config, a source with another adapter merged into it, a GGUF file."""
    if spec.lora is None:
        raise ValueError(
            "adapter_only: this student has no LoRA adapter (it was trained without model.student.lora)"
        )
    reasons = (
        (spec.init_from_teacher_layers is not None, "its base is a subset of the teacher's blocks"),
        (spec.config is not None, "its base is a randomly initialised model.student.config"),
        (spec.adapter is not None, f"its base has model.student.adapter {spec.adapter!r} merged into it"),
        (spec.source is not None and Path(spec.source).suffix == ".gguf", "its base is a GGUF file"),
    )
    for applies, reason in reasons:
        if applies:
            raise ValueError(
                f"adapter_only: {reason}, which no model name loads, so the adapter alone cannot be used; export "
                "the merged student (without adapter_only)"
            )
    if spec.source == DEFAULT_TEACHER:
        return str(default_teacher_dir()), None
    folder = Path(spec.source).expanduser()
    return (str(folder.resolve()), None) if folder.is_dir() else (spec.source, spec.revision)


@contextmanager
def _naming_base(student: PeftModel, base: tuple[str, str | None]) -> Iterator[None]:
    """The student's adapter configs naming ``base`` while it is saved, as they were afterwards."""
    configs = list(student.peft_config.values())
    before = [(config.base_model_name_or_path, config.revision) for config in configs]
    for config in configs:
        config.base_model_name_or_path, config.revision = base
    try:
        yield
    finally:
        for config, (name, revision) in zip(configs, before, strict=True):
            config.base_model_name_or_path, config.revision = name, revision


def export_trained_student(
    student: PreTrainedModel | PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    template: str | None,
    adapter_only: bool = False,
    overwrite: bool = False,
    student_spec: ModelSpec | None = None,
) -> Path:
    """`export_student` with a tokenizer that prompts the student as training did.

    With ``adapter_only``, the adapter folder names the base ``student_spec`` loads (`adapter_base`), or the
    export is refused where no name gives it.

    ``template`` (the data module's: "alpaca", "chat" or a string) becomes the exported tokenizer's chat
    template and is recorded in config.json; None keeps the tokenizer's own. ``model_max_length`` becomes the
    model's ``max_position_embeddings`` where the tokenizer claims more (a GGUF tokenizer says 1e30): the longest
    input the architecture takes, rather than the training max_length, which is a choice of data, not a limit of
    the model. The caller's tokenizer is left as it was.
    """
    tokenizer = copy.deepcopy(tokenizer)
    config = student.config
    if template is not None:
        tokenizer.chat_template = chat_template_for(template, tokenizer)
        config.distillens_prompt_template = template
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and not tokenizer.model_max_length <= positions:
        tokenizer.model_max_length = positions
    if not (adapter_only and student_spec is not None):
        return export_student(student, tokenizer, out_dir, adapter_only=adapter_only, overwrite=overwrite)
    with _naming_base(student, adapter_base(student_spec)):
        return export_student(student, tokenizer, out_dir, adapter_only=True, overwrite=overwrite)
