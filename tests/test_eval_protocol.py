"""The reference's evaluation protocol: n-gram blocking, long test prompts cut (not dropped), a reference-length filter
per test set, 256 new tokens, a results table that states its protocol, and the absolute cosine floor.

Expected values are computed here independently (token counts with the tokenizer, n-gram counts on the generated
ids, the cosine formula) rather than read back from the code under test.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillens.data import InstructionDataModule
from distillens.evaluation import GenerationEvaluator, GenerationSettings
from distillens.generation import generate
from distillens.optimization import OptimizerConfig, warmup_cosine
from distillens.results import protocol_line, results_markdown

LONG = "word " * 40  # 40 GPT-2 tokens ("word" then " word" x 39) plus the template's


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ready(tokenizer, tmp_path: Path, stage: str, **kwargs) -> InstructionDataModule:
    datamodule = InstructionDataModule(cache_dir=str(tmp_path / "cache"), template="{instruction}:", **kwargs)
    datamodule.connect(tokenizer)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


# ------------------------------------------------------------------------------------------------ test sets


def test_long_test_prompts_are_cut_to_their_first_tokens_and_counted(gpt2_tokenizer, tmp_path, caplog):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": LONG, "output": "kept"}]
    source = write_jsonl(tmp_path / "sni" / "valid.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(
            gpt2_tokenizer, tmp_path, "test", test=str(source), max_prompt_length=8, max_length=16
        )
    stats = datamodule.stats["sni"]
    assert (stats.kept, stats.prompts_truncated, stats.long_prompts_dropped) == (2, 1, 0)
    assert "sni: cut 1 prompts to their first max_prompt_length=8 tokens" in caplog.text
    batch = next(iter(datamodule.generation_dataloader("sni")))
    full_prompt = gpt2_tokenizer(f"{LONG}:")["input_ids"]
    assert len(full_prompt) > 8
    cut_row = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    assert cut_row.tolist() == full_prompt[:8]  # the first 8 tokens, as the reference truncates
    assert batch["prompts"][1] == gpt2_tokenizer.decode(
        full_prompt[:8]
    )  # the answers file shows what was asked
    assert batch["references"][1] == ["kept"]


def test_long_training_prompts_are_still_dropped(gpt2_tokenizer, tmp_path):
    rows = [{"instruction": "short", "output": "ok"}, {"instruction": LONG, "output": "dropped"}]
    source = write_jsonl(tmp_path / "train.jsonl", rows)
    datamodule = ready(gpt2_tokenizer, tmp_path, "fit", train=str(source), max_prompt_length=8, max_length=16)
    stats = datamodule.stats["train"]
    assert (stats.kept, stats.long_prompts_dropped, stats.prompts_truncated) == (1, 1, 0)


def test_min_reference_tokens_keeps_rows_with_a_reference_that_long(gpt2_tokenizer, tmp_path, caplog):
    references = ["one two", "one two three four five", ["a", "one two three four five six"], ["x", "y z"]]
    rows = [{"instruction": f"q{i}", "output": output} for i, output in enumerate(references)]
    sni = write_jsonl(tmp_path / "sni" / "valid.jsonl", rows)
    dolly = write_jsonl(tmp_path / "dolly" / "valid.jsonl", rows)
    minimum = 5
    lengths = [
        [len(gpt2_tokenizer(text)["input_ids"]) for text in ([r] if isinstance(r, str) else r)]
        for r in references
    ]
    expected = [refs for refs, counts in zip(references, lengths, strict=True) if max(counts) >= minimum]
    assert 0 < len(expected) < len(references)  # the filter has something to keep and something to drop
    with caplog.at_level(logging.INFO, logger="distillens.data"):
        datamodule = ready(
            gpt2_tokenizer,
            tmp_path,
            "test",
            test=[str(sni), str(dolly)],
            min_reference_tokens={"sni": minimum},
        )
    kept = [refs for batch in datamodule.generation_dataloader("sni") for refs in batch["references"]]
    assert kept == [[refs] if isinstance(refs, str) else refs for refs in expected]
    assert datamodule.stats["sni"].short_references_dropped == len(references) - len(expected)
    assert datamodule.stats["dolly"].kept == len(references)  # the other set is not filtered
    assert f"{len(references) - len(expected)} dropped for short references" in caplog.text
    assert datamodule.eval_protocol() == {
        "max_prompt_length": 256,
        "min_reference_tokens": {"sni": minimum},
        "prompts_truncated": {"sni": 0, "dolly": 0},
        "short_references_dropped": {"sni": len(references) - len(expected), "dolly": 0},
    }


@pytest.mark.parametrize(
    ("minimums", "message"),
    [
        ({"unni": 11}, "min_reference_tokens: no test set named 'unni' \\(test sets: sni\\)"),
        ({"sni": 0}, "min_reference_tokens\\['sni'\\]=0: use a positive token count"),
    ],
)
def test_min_reference_tokens_names_a_bad_set_or_count(tmp_path, minimums, message):
    source = write_jsonl(tmp_path / "sni" / "valid.jsonl", [{"instruction": "q", "output": "a"}])
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(test=str(source), min_reference_tokens=minimums)


# ------------------------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def tiny_llama(smollm2_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).double()


def repeated_ngrams(ids: list[int], n: int) -> int:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams))


def recorded_generations(model, monkeypatch) -> list:
    """Every sequence ``model.generate`` returns from now on, (1, T + new) each, in call order."""
    produced = []
    original = model.generate

    def recording(*args, **kwargs):
        produced.append(original(*args, **kwargs))  # (1, T + new)
        return produced[-1]

    monkeypatch.setattr(model, "generate", recording)
    return produced


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_size_blocks_every_repeat_of_the_whole_sequence(
    tiny_llama, smollm2_tokenizer, monkeypatch, n
):
    """Greedy decoding of a random model repeats itself; with the option, no n-gram occurs twice (prompt included)."""
    produced = recorded_generations(tiny_llama, monkeypatch)
    prompt = smollm2_tokenizer(["Tell me about the sea and the sky."], return_tensors="pt")
    options = dict(max_new_tokens=48, do_sample=False)
    for size in (0, n):
        generate(tiny_llama, smollm2_tokenizer, prompt["input_ids"], prompt["attention_mask"], **options,
                 no_repeat_ngram_size=size)  # fmt: skip
    free, blocked = (sequence[0].tolist() for sequence in produced)
    assert repeated_ngrams(free, n) > 0, "the unblocked answer repeats nothing: the test would prove nothing"
    assert repeated_ngrams(blocked, n) == 0


def test_the_evaluator_answers_under_the_configured_ngram_blocking(
    tiny_llama, smollm2_tokenizer, monkeypatch
):
    """What `distillens test` and validation generation call: GenerationEvaluator.answer, with the settings'
    no_repeat_ngram_size (the protocol line only restates the settings; the answers must follow them)."""
    produced = recorded_generations(tiny_llama, monkeypatch)
    prompt = "Tell me about the sea and the sky."
    encoded = smollm2_tokenizer([prompt], return_tensors="pt")
    batch = {**encoded, "index": [0], "prompts": [prompt], "references": [["The sea."]], "name": "set"}
    for size in (0, 3):
        settings = GenerationSettings(max_new_tokens=48, do_sample=False, no_repeat_ngram_size=size)
        GenerationEvaluator(settings, smollm2_tokenizer).answer(tiny_llama, batch, seed=10)
    free, blocked = (sequence[0].tolist() for sequence in produced)
    assert repeated_ngrams(free, 3) > 0, "the unblocked answer repeats nothing: the test would prove nothing"
    assert repeated_ngrams(blocked, 3) == 0


def test_negative_no_repeat_ngram_size_is_refused(tiny_llama, smollm2_tokenizer):
    prompt = smollm2_tokenizer(["Hi"], return_tensors="pt")
    with pytest.raises(ValueError, match="no_repeat_ngram_size=-1"):
        generate(
            tiny_llama,
            smollm2_tokenizer,
            prompt["input_ids"],
            prompt["attention_mask"],
            no_repeat_ngram_size=-1,
        )


def test_generation_defaults_are_the_papers_length_budget():
    settings = GenerationSettings()
    assert (settings.max_new_tokens, settings.no_repeat_ngram_size) == (256, 0)


# ------------------------------------------------------------------------------------------------ results table


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


# ------------------------------------------------------------------------------------------------ cosine floor


def test_absolute_cosine_floor_ends_the_schedule_at_min_lr():
    config = OptimizerConfig(lr=2e-4, warmup=0.0, min_lr=1e-7)
    total = 50
    schedule = warmup_cosine(0, total, config.floor_ratio)
    expected = [
        1e-7 + (2e-4 - 1e-7) * 0.5 * (1 + math.cos(math.pi * step / total)) for step in range(total + 1)
    ]
    assert [config.lr * schedule(step) for step in range(total + 1)] == pytest.approx(expected, rel=1e-9)
    assert config.lr * schedule(0) == pytest.approx(2e-4)  # no warm-up: the peak at once
    assert OptimizerConfig(lr=2e-4).floor_ratio == 0.1  # the ratio stays the default when min_lr is unset
    with pytest.raises(ValueError, match="optimizer.min_lr=0.001: must be between 0 and optimizer.lr=0.0002"):
        OptimizerConfig(lr=2e-4, min_lr=1e-3)
