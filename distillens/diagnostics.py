"""Lens diagnostics: at which depth the student's reading of a text departs from the teacher's (the paper's Figure 1).

Every student hidden state i = 0..L_S (0 = embeddings) is compared with the teacher hidden state at the same
*relative* depth, j(i) = round(i * L_T / L_S). This proportional mapping pairs embeddings with embeddings and last
block with last block whatever the two depths are, so one curve shows where along its depth the student departs;
comparing every teacher depth with one student layer would instead describe the teacher alone.

At every supervised position (labels != -100, as in the objective) and every depth, the logit lens of both models
gives a distribution over the vocabulary, from which come:

- the divergence between them (Jensen-Shannon by default, the paper's lens divergence): how far apart they are;
- the entropy of each: whether the student is more or less confident than the teacher at that depth;
- top-1 agreement of each with the teacher's final prediction: from which depth each model "has" the answer.

The lens always applies the model's final norm here (the proper logit lens), even when training reproduces the
published code's lens without it. Everything is averaged over tokens and reported per depth.
Nothing here depends on the training module: the validation callback and `distillens diagnose` share this code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from transformers import PreTrainedModel

from distillens.data import InstructionDataModule
from distillens.export import student_and_checkpoint
from distillens.generation import eval_mode
from distillens.lens import LogitLens
from distillens.losses import IGNORE_INDEX, get_token_divergence, log_probs
from distillens.models import ModelSpec, check_same_vocabulary, load_model, load_tokenizer
from distillens.objective import LayerPairs

log = logging.getLogger(__name__)

QUANTITIES = ("divergence", "student_entropy", "teacher_entropy", "student_top1", "teacher_top1")
"""Per-depth values of a report, in the order they are accumulated."""


@dataclass
class LensReport:
    """Per-depth diagnostics of one student against one teacher, averaged over `tokens` supervised tokens.

    Entry k of each list belongs to student hidden state `student_layers[k]` and teacher hidden state
    `teacher_layers[k]`. Entropies are in nats; top-1 agreements are fractions in [0, 1].
    """

    divergence_name: str
    student_layers: list[int]
    teacher_layers: list[int]
    divergence: list[float]
    student_entropy: list[float]
    teacher_entropy: list[float]
    student_top1: list[float]
    teacher_top1: list[float]
    tokens: int

    def scalars(self, prefix: str = "lens_diag") -> dict[str, float]:
        """Flat `<prefix>/<quantity>/s<i>_t<j>` values for a logger."""
        pairs = list(zip(self.student_layers, self.teacher_layers, strict=True))
        return {
            f"{prefix}/{quantity}/s{i}_t{j}": value
            for quantity in QUANTITIES
            for (i, j), value in zip(pairs, getattr(self, quantity), strict=True)
        }


def proportional_depths(student_depth: int, teacher_depth: int) -> list[int]:
    """Teacher hidden-state index at the same relative depth as each student index 0..student_depth."""
    if student_depth < 1 or teacher_depth < 1:
        raise ValueError(f"depths must be >= 1 block; got student {student_depth}, teacher {teacher_depth}")
    return [round(i * teacher_depth / student_depth) for i in range(student_depth + 1)]


# ---------------------------------------------------------------------------------------------------------------
# Computing
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def lens_diagnostics(
    student: LogitLens,
    teacher: LogitLens,
    batches: Iterable[dict[str, Tensor]],
    *,
    divergence: str = "jsd",
    chunk_size: int = 256,
    pairs: tuple[list[int], list[int]] | None = None,
) -> LensReport:
    """Diagnostics over teacher-forced `batches` (dicts with `input_ids`, `attention_mask`, `labels`).

    ``pairs`` (student, teacher hidden-state indices) chooses the depths compared, e.g. the pairs a run trained
    with; None compares every student depth with the teacher's at the same relative depth.
    Only supervised positions are projected to the vocabulary, `chunk_size` rows at a time, so memory holds a few
    (chunk_size, V) blocks whatever the number of tokens or depths.
    """
    token_divergence = get_token_divergence(divergence)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be at least 1")
    student_layers, teacher_layers = pairs or (
        list(range(student.num_layers + 1)),
        proportional_depths(student.num_layers, teacher.num_layers),
    )
    sums = torch.zeros(len(QUANTITIES), len(student_layers), dtype=torch.float64)  # (Q, pairs)
    tokens = 0
    with eval_mode(student.model), eval_mode(teacher.model):
        for batch in batches:
            s_rows = _supervised_rows(student, batch, sorted(set(student_layers)))  # layer -> (N, d_S)
            t_rows = _supervised_rows(teacher, batch, sorted({*teacher_layers, teacher.num_layers}))
            supervised = len(t_rows[teacher.num_layers])
            tokens += supervised
            for start in range(0, supervised, chunk_size):
                rows = slice(start, start + chunk_size)
                answer = teacher.logits(t_rows[teacher.num_layers][rows]).argmax(-1)  # (n,)
                for k, (i, j) in enumerate(zip(student_layers, teacher_layers, strict=True)):
                    sums[:, k] += _chunk_sums(
                        student.logits(s_rows[i][rows]),
                        teacher.logits(t_rows[j][rows]),
                        answer,
                        token_divergence,
                    )
    if tokens == 0:
        raise ValueError(
            f"no supervised token in the batches: every label is {IGNORE_INDEX}, nothing to diagnose"
        )
    means = (sums / tokens).tolist()
    return LensReport(divergence, list(student_layers), list(teacher_layers), *means, tokens=tokens)


def _supervised_rows(lens: LogitLens, batch: dict[str, Tensor], layers: list[int]) -> dict[int, Tensor]:
    """Raw hidden states of `layers` at the positions that predict a supervised token, as (N, d) rows."""
    device = next(lens.model.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    next_labels = batch["labels"][:, 1:].to(device)  # (B, T-1): position t predicts token t+1
    predicts_label = next_labels != IGNORE_INDEX  # (B, T-1)
    with lens.capture(layers) as hidden:
        lens.model(**inputs, use_cache=False, logits_to_keep=1)  # hidden states only, no (B, T, V) logits
    return {i: hidden[i][:, :-1][predicts_label] for i in layers}  # (N, d)


def _chunk_sums(student_logits: Tensor, teacher_logits: Tensor, answer: Tensor, token_divergence) -> Tensor:
    """Sums over a chunk's rows of each quantity in QUANTITIES; logits (n, V), answer (n,) -> (Q,)."""
    logp_s, logp_t = log_probs(student_logits), log_probs(teacher_logits)  # (n, V) fp32
    return torch.stack(
        [
            token_divergence(student_logits, teacher_logits).sum(),
            _entropy(logp_s).sum(),
            _entropy(logp_t).sum(),
            (logp_s.argmax(-1) == answer).sum().float(),
            (logp_t.argmax(-1) == answer).sum().float(),
        ]
    ).to(device="cpu", dtype=torch.float64)  # (Q,)


def _entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)  # (n,)


# ---------------------------------------------------------------------------------------------------------------
# Figure and files
# ---------------------------------------------------------------------------------------------------------------


def plot_lens_diagnostics(report: LensReport) -> Figure:
    """Three panels over the student's depth: divergence, entropies, top-1 agreement with the teacher's answer.

    Built with matplotlib's object API on an Agg canvas: no pyplot state and no display needed.
    """
    figure = Figure(figsize=(13, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    depth = report.student_layers
    ticks = [f"{i}\n(T{j})" for i, j in zip(report.student_layers, report.teacher_layers, strict=True)]
    panels = figure.subplots(1, 3)
    panels[0].plot(depth, report.divergence, marker="o", color="tab:red")
    panels[0].set_ylabel(f"{report.divergence_name} (nats)")
    panels[0].set_title("student vs teacher lens")
    for panel, quantity, title, unit in (
        (panels[1], "entropy", "lens entropy", "nats"),
        (panels[2], "top1", "top-1 = teacher's final top-1", "fraction of tokens"),
    ):
        panel.plot(depth, getattr(report, f"student_{quantity}"), marker="o", label="student")
        panel.plot(
            depth, getattr(report, f"teacher_{quantity}"), marker="s", label="teacher (same rel. depth)"
        )
        panel.set_title(title)
        panel.set_ylabel(unit)
        panel.legend(fontsize="small")
    panels[2].set_ylim(-0.02, 1.02)
    for panel in panels:
        panel.set_xticks(depth, ticks, fontsize="small")
        panel.set_xlabel("student layer (teacher layer)")
        panel.grid(alpha=0.3)
    figure.suptitle(f"Logit-lens diagnostics over {report.tokens} supervised tokens")
    return figure


def save_lens_diagnostics(
    report: LensReport, out_dir: str | Path, name: str = "lens_diagnostics"
) -> tuple[Path, Path]:
    """Write `<name>.png` (the figure) and `<name>.json` (the report) in `out_dir`; return both paths."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    png, report_json = folder / f"{name}.png", folder / f"{name}.json"
    plot_lens_diagnostics(report).savefig(png, dpi=110)
    report_json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return png, report_json


# ---------------------------------------------------------------------------------------------------------------
# Any two models on a data file (`distillens diagnose`)
# ---------------------------------------------------------------------------------------------------------------

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
