"""Generation (distillens.generation) on a tiny random Llama with SmolLM2's tokenizer: left-padded batches answer
as each prompt alone, only new tokens come back, seeds reproduce, modes and the random state are restored, n-gram
blocking covers the whole sequence."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import recorded_generations, repeated_ngrams

from distillens.generation import generate

# ----------------------------------------------------------------------------------------------- generation

PROMPTS = ["Write a short poem about the sea.", "Hi", "List three primary colours, please:"]


def _left_padded(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    return batch["input_ids"], batch["attention_mask"]  # (B, T), (B, T)


def test_greedy_batched_left_padded_equals_each_prompt_alone(smollm2_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS)
    assert not attention_mask.all()  # the batch really is padded
    batched = generate(
        smollm2_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=8, do_sample=False
    )
    alone = [
        generate(
            smollm2_llama,
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


def test_greedy_output_is_only_the_new_tokens(smollm2_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS[:1])
    full = smollm2_llama.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=5
    )  # (1, T + 5), stops early only at the config's eos, which SmolLM2's tokenizer also skips when decoding
    expected = smollm2_tokenizer.decode(full[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert generate(
        smollm2_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=5, do_sample=False
    ) == [expected]


def test_sampling_is_reproducible_per_seed_and_differs_across_seeds(smollm2_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS)

    def sample(seed):
        return generate(
            smollm2_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=8, seed=seed
        )

    first = sample(1)
    assert len(first) == len(PROMPTS)
    assert sample(1) == first
    assert sample(2) != first  # 3 x 8 draws over 49,152 nearly uniform tokens: equal only by a miracle


def test_generation_restores_training_mode_and_rng_state(smollm2_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS[:2])
    smollm2_llama.train()
    rng_before = torch.get_rng_state()
    generate(smollm2_llama, smollm2_tokenizer, input_ids, attention_mask, max_new_tokens=4, seed=3)
    assert smollm2_llama.training
    assert torch.equal(torch.get_rng_state(), rng_before)
    smollm2_llama.eval()


def test_generation_stops_at_the_tokenizers_eos(smollm2_llama, smollm2_tokenizer):
    input_ids, attention_mask = _left_padded(smollm2_tokenizer, PROMPTS[:1])
    full = smollm2_llama.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=6
    )
    new_ids = full[0, input_ids.shape[1] :].tolist()
    stop_id = new_ids[3]  # pretend the 4th greedy token is eos: generation must end before it
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(stop_id)
    expected = tokenizer.decode(new_ids[: new_ids.index(stop_id)], skip_special_tokens=True)
    assert generate(
        smollm2_llama, tokenizer, input_ids, attention_mask, max_new_tokens=6, do_sample=False
    ) == [expected]


def test_generation_rejects_right_padding(smollm2_llama, smollm2_tokenizer):
    batch = smollm2_tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(
            smollm2_llama, smollm2_tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens=2
        )


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_size_blocks_every_repeat_of_the_whole_sequence(
    smollm2_llama, smollm2_tokenizer, monkeypatch, n
):
    """Greedy decoding of a random model repeats itself; with the option, no n-gram occurs twice (prompt included)."""
    produced = recorded_generations(smollm2_llama, monkeypatch)
    prompt = smollm2_tokenizer(["Tell me about the sea and the sky."], return_tensors="pt")
    options = dict(max_new_tokens=48, do_sample=False)
    for size in (0, n):
        generate(smollm2_llama, smollm2_tokenizer, prompt["input_ids"], prompt["attention_mask"], **options,
                 no_repeat_ngram_size=size)  # fmt: skip
    free, blocked = (sequence[0].tolist() for sequence in produced)
    assert repeated_ngrams(free, n) > 0, "the unblocked answer repeats nothing: the test would prove nothing"
    assert repeated_ngrams(blocked, n) == 0


def test_negative_no_repeat_ngram_size_is_refused(smollm2_llama, smollm2_tokenizer):
    prompt = smollm2_tokenizer(["Hi"], return_tensors="pt")
    with pytest.raises(ValueError, match="no_repeat_ngram_size=-1"):
        generate(
            smollm2_llama,
            smollm2_tokenizer,
            prompt["input_ids"],
            prompt["attention_mask"],
            no_repeat_ngram_size=-1,
        )
