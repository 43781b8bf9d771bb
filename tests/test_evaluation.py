"""The evaluator (distillens.evaluation): its settings and batch seeds, and its answers following the settings'
n-gram blocking; `distillens test` and validation generation end to end are in test_eval_protocol.py."""

from __future__ import annotations

import pytest
from helpers import recorded_generations, repeated_ngrams

from distillens.evaluation import GenerationEvaluator, GenerationSettings, batch_seed


def test_batch_seed_differs_across_batches_and_seeds():
    seeds = {batch_seed(seed, first) for seed in (1, 2, 3) for first in (0, 8, 16)}
    assert len(seeds) == 9


def test_generation_settings_reject_bad_values():
    with pytest.raises(ValueError, match="every_n_val=-1"):
        GenerationSettings(every_n_val=-1)
    with pytest.raises(ValueError, match="generator='judge'"):
        GenerationSettings(generator="judge")
    with pytest.raises(ValueError, match="seeds is empty"):
        GenerationSettings(seeds=[])


def test_the_evaluator_answers_under_the_configured_ngram_blocking(
    smollm2_llama, smollm2_tokenizer, monkeypatch
):
    """What `distillens test` and validation generation call: GenerationEvaluator.answer, with the settings'
    no_repeat_ngram_size (the protocol line only restates the settings; the answers must follow them)."""
    produced = recorded_generations(smollm2_llama, monkeypatch)
    prompt = "Tell me about the sea and the sky."
    encoded = smollm2_tokenizer([prompt], return_tensors="pt")
    batch = {**encoded, "index": [0], "prompts": [prompt], "references": [["The sea."]], "name": "set"}
    for size in (0, 3):
        settings = GenerationSettings(max_new_tokens=48, do_sample=False, no_repeat_ngram_size=size)
        GenerationEvaluator(settings, smollm2_tokenizer).answer(smollm2_llama, batch, seed=10)
    free, blocked = (sequence[0].tolist() for sequence in produced)
    assert repeated_ngrams(free, 3) > 0, "the unblocked answer repeats nothing: the test would prove nothing"
    assert repeated_ngrams(blocked, 3) == 0


def test_generation_defaults_are_the_papers_length_budget():
    settings = GenerationSettings()
    assert (settings.max_new_tokens, settings.no_repeat_ngram_size) == (256, 0)
