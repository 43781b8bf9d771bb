"""LoRA students in one place: the adapters' settings, wrapping a model in them, what identifies the frozen base
they were trained on, the adapters-only checkpoint (base weights left out on save, put back on load once the base
is known to be the same), and the merge into a plain model.

A LoRA student's checkpoint holds the adapters and their optimizer state only: the base weights are its source's,
loaded again on resume or export. What makes that safe is the base's fingerprint, recorded on save and checked on
load, so that adapters are never silently put on other weights.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

LORA_BASE = "lora_base_fingerprint"
"""Checkpoint key: the fingerprint of the frozen base weights a LoRA student's adapters were trained on."""


@dataclass
class LoraSpec:
    """Low-rank adapters (LoRA, through PEFT) trained in place of the student's weights, which stay frozen."""

    r: int = 8
    """Rank of each adapter (the paper's Qwen run: 8)."""
    alpha: float = 32.0
    """Scaling numerator: the adapter's update is multiplied by alpha / r (the paper's Qwen run: 32)."""
    dropout: float = 0.1
    """Dropout on the adapter's input while training (the paper's Qwen run: 0.1)."""
    target_modules: list[str] | str | None = None
    """Names (or name suffixes) of the linear layers to adapt, e.g. [q_proj, v_proj], one name (q_proj), or
    "all-linear"; None uses PEFT's default for the model family (q_proj and v_proj for Llama and Qwen2, c_attn for
    GPT-2)."""

    def __post_init__(self) -> None:
        """One line naming the setting at fault and its value alone (only a student has LoRA adapters)."""
        for name, bad, rule in (
            ("r", self.r < 1, "must be >= 1"),
            ("alpha", self.alpha <= 0, "must be > 0"),
            ("dropout", not 0 <= self.dropout < 1, "must be in [0, 1)"),
        ):
            if bad:
                raise ValueError(f"model.student.lora.{name}={getattr(self, name)}: {rule}")


def add_lora(model: PreTrainedModel, lora: LoraSpec | LoraConfig) -> PeftModel:
    """Wrap a model in trainable LoRA adapters (B = 0 at first, so it computes exactly what the model did).

    The wrapper forwards everything else to the model (config, generation, get_decoder, output embeddings), so
    the logit lens reads the student's real final norm and unembedding through it. A PEFT ``LoraConfig`` (another
    wrapped model's) gives the same adapters again.
    """
    if isinstance(lora, LoraConfig):
        config, targets = copy.deepcopy(lora), lora.target_modules
    else:
        targets = lora.target_modules
        if isinstance(targets, str) and targets != "all-linear":
            # one name or suffix, as in a list; PEFT would read a string as a regex of whole module names
            targets = [targets]
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(targets) if isinstance(targets, list | tuple) else targets,
            task_type="CAUSAL_LM",
        )
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"lora.target_modules={targets!r} on {type(model).__name__}: {reason}") from None


def frozen_parameters(model: PeftModel) -> list[tuple[str, torch.Tensor]]:
    """A LoRA-wrapped model's frozen (base) parameters, by name."""
    return [(name, param) for name, param in model.named_parameters() if not param.requires_grad]


def is_lora(model: Any) -> bool:
    """Whether a model is wrapped in PEFT adapters (its base weights then stay frozen)."""
    return isinstance(model, PeftModel)


def merged_copy(model: PeftModel) -> PreTrainedModel:
    """A plain model computing what the LoRA-wrapped one does; the wrapped model itself is left untouched."""
    return copy.deepcopy(model).merge_and_unload()


def weights_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A digest of named tensors (names, dtypes, shapes and values): equal for the same weights only.

    What identifies a LoRA student's base, which its checkpoint leaves out and which is loaded again from the
    student's source: a folder whose files changed still has the same name. About a second per 500 MB.
    """
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(named, key=lambda item: item[0]):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)  # (N,)
        digest.update(f"{name} {data.dtype} {tuple(tensor.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy())  # (N * itemsize,) raw bytes
    return digest.hexdigest()


def check_lora_base(path: str | Path | None, checkpoint: dict[str, Any], fingerprint: str, base: str) -> None:
    """One line when ``checkpoint``'s adapters were trained on other base weights than the ``fingerprint`` of the
    base just built (``base`` says where it came from); checkpoints written before fingerprints pass."""
    recorded = checkpoint.get(LORA_BASE)
    if recorded is None or recorded == fingerprint:
        return
    raise ValueError(
        f"{path or 'the checkpoint'}: its LoRA adapters were trained on other base weights than {base} holds now "
        f"(fingerprint {recorded} there, {fingerprint} here); use the base the run was trained on"
    )


# ---------------------------------------------------------------------------------------------- adapters-only checkpoints


def adapters_only_checkpoints(student: Any, rebuildable: bool, sharded: bool) -> bool:
    """Whether checkpoints of ``student`` leave its base out: a LoRA student whose spec rebuilds the same base
    weights at every load (``models.rebuildable``: a source, not a random config), and not sharded (Lightning's
    distributed loader expects every key of the model)."""
    return is_lora(student) and rebuildable and not sharded


def frozen_keys(student: Any, prefix: str = "student.") -> set[str]:
    """State-dict keys of the student's frozen parameters (tied ones under each of their names)."""
    named = student.named_parameters(remove_duplicate=False)
    return {f"{prefix}{name}" for name, param in named if not param.requires_grad}


def leave_base_out(checkpoint: dict[str, Any], student: Any, fingerprint: str) -> None:
    """Drop the student's frozen base weights from ``checkpoint`` and record what identifies them."""
    frozen = frozen_keys(student)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
    checkpoint[LORA_BASE] = fingerprint


def put_base_back(
    checkpoint: dict[str, Any], state: dict[str, torch.Tensor], student: Any, fingerprint: str, where: tuple
) -> None:
    """Complete an adapters-only ``checkpoint`` with the base weights in ``state`` (the module's, just built),
    once they are known to be those the adapters were trained on. ``where``: the checkpoint's path and a
    description of the base, for the error line."""
    path, base = where
    check_lora_base(path, checkpoint, fingerprint, base)
    saved = checkpoint["state_dict"]
    saved.update({key: state[key] for key in frozen_keys(student) - saved.keys()})
