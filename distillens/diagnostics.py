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
Nothing here depends on the training module: the validation callback and `distillens diagnose` (diagnose.py)
share this code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from distillens.generation import eval_mode
from distillens.lens import LogitLens
from distillens.losses import IGNORE_INDEX, get_token_divergence, log_probs

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
def copied_depths(copied_from: list[int] | None) -> tuple[list[int], list[int]] | None:
    """Every depth of a layer-subset student with the teacher depth its block was copied from (None otherwise).

    Student hidden state b + 1 is the output of a copy of teacher block c, hidden state c + 1; the embeddings (0)
    are shared. Any other student is compared at the same relative depth (``lens_diagnostics``' default).
    """
    if not copied_from:
        return None
    return list(range(len(copied_from) + 1)), [0, *(block + 1 for block in copied_from)]


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
