"""Scores and result tables (distillens.results) against rouge_score and numpy called directly."""

from __future__ import annotations

import numpy as np
import pytest
from reference import PREDICTIONS, REFERENCES, rouge_l_by_hand

from distillens.evaluation import GenerationSettings
from distillens.records import GenerationRecord
from distillens.results import (
    aggregate_over_seeds,
    protocol_line,
    results_markdown,
    score_records,
    summarize_runs,
    write_results,
)


def record(index: int, prediction: str = "", references=("ref",), prompt: str = "p") -> GenerationRecord:
    return GenerationRecord(index, prompt, tuple(references), prediction)


# ----------------------------------------------------------------------------------------------- seeds


def test_aggregate_over_seeds_matches_numpy():
    scores = [{"rougeL": 21.0, "em": 3.0}, {"rougeL": 22.5, "em": 4.0}, {"rougeL": 19.9, "em": 3.5}]
    rouge = np.array([21.0, 22.5, 19.9])
    summary = aggregate_over_seeds(scores)
    assert summary["rougeL"] == pytest.approx((rouge.mean(), rouge.std(ddof=0)))
    assert summary["em"] == pytest.approx((3.5, np.std([3.0, 4.0, 3.5])))
    assert aggregate_over_seeds(scores, ddof=1)["rougeL"] == pytest.approx((rouge.mean(), rouge.std(ddof=1)))


def test_aggregate_over_seeds_single_seed_has_zero_std():
    assert aggregate_over_seeds([{"rougeL": 17.2}]) == {"rougeL": (17.2, 0.0)}


def test_aggregate_over_seeds_rejects_inconsistent_metrics():
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        aggregate_over_seeds([{"rougeL": 1.0, "em": 0.0}, {"rougeL": 2.0}])
    with pytest.raises(ValueError, match="empty"):
        aggregate_over_seeds([])


# ----------------------------------------------------------------------------------------------- scores and tables


def test_score_records_skips_records_without_references_and_scores_blank_answers_zero():
    records = [
        record(0, PREDICTIONS[0], REFERENCES[0]),
        record(1, "", REFERENCES[1]),  # empty generation
        record(2, PREDICTIONS[2], ()),  # no reference: no defined score
        record(3, PREDICTIONS[3], ["", REFERENCES[3][0]]),  # an empty reference beside a real one
    ]
    expected = rouge_l_by_hand(
        [PREDICTIONS[0], "", PREDICTIONS[3]], [REFERENCES[0], REFERENCES[1], ["", REFERENCES[3][0]]]
    )
    scores = score_records(records, ["rougeL", "exact_match"])
    assert scores["rougeL"] == pytest.approx(np.mean(expected))
    assert expected[1] == 0.0
    assert scores["exact_match"] == 0.0
    with pytest.raises(ValueError, match="none of the 1 generated answers"):
        score_records([record(0, "x", ())], ["rougeL"])


def _runs():
    """Two sets, three seeds: answers that differ per seed so that the std is not 0."""
    runs = {}
    for name, offset in (("dolly", 0), ("vicuna", 1)):
        runs[name] = {
            seed: [record(i, PREDICTIONS[(i + seed + offset) % 4], REFERENCES[i]) for i in range(4)]
            for seed in (10, 20, 30)
        }
    return runs


def test_summarize_runs_matches_rouge_score_and_numpy():
    runs = _runs()
    results = summarize_runs(runs, ["rougeL"])
    per_set_seed = {
        name: [
            np.mean(rouge_l_by_hand([r.prediction for r in recs], [list(r.references) for r in recs]))
            for recs in by_seed.values()
        ]
        for name, by_seed in runs.items()
    }
    for name, values in per_set_seed.items():
        summary = results["sets"][name]
        assert summary["mean"]["rougeL"] == pytest.approx(np.mean(values))
        assert summary["std"]["rougeL"] == pytest.approx(np.std(values))
        assert [summary["per_seed"][str(s)]["rougeL"] for s in (10, 20, 30)] == pytest.approx(values)
        assert summary["examples"] == 4
    average_per_seed = np.mean([per_set_seed["dolly"], per_set_seed["vicuna"]], axis=0)
    assert results["average"]["mean"]["rougeL"] == pytest.approx(average_per_seed.mean())
    assert results["average"]["std"]["rougeL"] == pytest.approx(average_per_seed.std())
    assert results["seeds"] == [10, 20, 30]
    assert np.std(per_set_seed["dolly"]) > 0  # the fixture really varies across seeds


def test_summarize_runs_counts_empty_predictions_and_rejects_mismatched_seeds():
    runs = {"a": {1: [record(0, ""), record(1, "  "), record(2, "ref")]}}
    assert summarize_runs(runs, ["rougeL"])["sets"]["a"]["empty_predictions"] == {"1": 2}
    runs["b"] = {2: [record(0, "x")]}
    with pytest.raises(ValueError, match="'b' has seeds"):
        summarize_runs(runs, ["rougeL"])


def test_results_markdown_has_one_row_per_set_and_the_average():
    results = summarize_runs(_runs(), ["rougeL", "exact_match"])
    lines = results_markdown(results).splitlines()
    assert lines[0] == "| set | examples | rougeL | exact_match |"
    rows = {line.split("|")[1].strip(): line for line in lines[2:5]}
    assert set(rows) == {"dolly", "vicuna", "average"}
    dolly = results["sets"]["dolly"]
    assert f"{dolly['mean']['rougeL']:.2f} ± {dolly['std']['rougeL']:.2f}" in rows["dolly"]
    assert "3 generation seed(s) (10, 20, 30)" in lines[-1]


def test_write_results_writes_json_markdown_and_answers(tmp_path):
    import json

    runs = _runs()
    results = summarize_runs(runs, ["rougeL"])
    paths = write_results(tmp_path / "eval", results, runs)
    assert {p.name for p in paths} == {"results.json", "results.md"} | {
        f"{name}.seed{seed}.jsonl" for name in runs for seed in (10, 20, 30)
    }
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    for name, by_seed in runs.items():  # the file's numbers against rouge_score and numpy directly
        per_seed = [
            np.mean(rouge_l_by_hand([r.prediction for r in recs], [list(r.references) for r in recs]))
            for recs in by_seed.values()
        ]
        assert written["sets"][name]["mean"]["rougeL"] == pytest.approx(np.mean(per_seed))
        assert written["sets"][name]["std"]["rougeL"] == pytest.approx(np.std(per_seed))
    assert written["seeds"] == [10, 20, 30] and written == json.loads(json.dumps(results))
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert f"{written['sets']['dolly']['mean']['rougeL']:.2f}" in markdown
    lines = (tmp_path / "eval" / "vicuna.seed20.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [row["index"] for row in rows] == [0, 1, 2, 3]
    assert rows[1] == {
        "index": 1,
        "prompt": "p",
        "references": REFERENCES[1],
        "prediction": runs["vicuna"][20][1].prediction,
        "new_tokens": None,  # unknown for records built by hand
        "ended": None,
    }


def test_results_table_states_the_protocol_it_ran_under():
    generation = {**vars(GenerationSettings(no_repeat_ngram_size=6)), "seeds": [10, 20]}
    data = {
        "max_prompt_length": 256,
        "min_reference_tokens": {"sni": 11, "unni": 11},
        "prompts_truncated": {"dolly": 2, "sni": 1, "unni": 0},
        "short_references_dropped": {"dolly": 0, "sni": 4, "unni": 7},
    }
    line = protocol_line(generation, data)
    assert line == (
        "Protocol: sampling (top_k 0, top_p 1.0, temperature 1.0); no_repeat_ngram_size 6; at most 256 new tokens; "
        "prompts cut to their first 256 tokens (3 cut); sni: references of at least 11 tokens (4 rows dropped); "
        "unni: references of at least 11 tokens (7 rows dropped)."
    )
    greedy = protocol_line({**generation, "do_sample": False, "no_repeat_ngram_size": 0})
    assert greedy == "Protocol: greedy decoding; no n-gram blocking; at most 256 new tokens."
    results = {
        "metrics": ["rougeL"],
        "seeds": [10],
        "sets": {"dolly": {"examples": 3, "mean": {"rougeL": 20.0}, "std": {"rougeL": 0.0}}},
        "generation": generation,
        "data": data,
    }
    assert results_markdown(results).splitlines()[-1] == line
