"""Scores and result tables: the answers of several eval sets under several generation seeds, as one table.

Each set's answers are scored per example (``example_scores``: every configured metric, against the prompt's own
references and another prompt's, ``measures.derangement``), then per seed (the prompt gap and the degeneration
diagnostics), then as mean and std over seeds (``aggregate_over_seeds``); ``summarize_runs`` makes the table,
``write_results`` writes it as JSON, Markdown and the answers as jsonl, ``metric_values`` names its values for a
logger. Nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillens.measures import DIAGNOSTICS, diagnostics, other_prompts_references
from distillens.metrics import PER_EXAMPLE_METRICS
from distillens.records import GenerationRecord


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


def metric_values(results: dict[str, Any]) -> dict[str, float]:
    """``test/<set>/<metric>`` (mean over seeds) and ``.../<metric>_std``; ``test/average/...`` for several sets."""
    rows = dict(results["sets"], **({"average": results["average"]} if len(results["sets"]) > 1 else {}))
    values = {}
    for name, summary in rows.items():
        for metric in results.get("measures", results["metrics"]):
            values[f"test/{name}/{metric}"] = summary["mean"][metric]
            values[f"test/{name}/{metric}_std"] = summary["std"][metric]
    return values
