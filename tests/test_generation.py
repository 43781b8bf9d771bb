"""Generation (distillens.generation) on a tiny random Llama with SmolLM2's tokenizer: left-padded batches answer
as each prompt alone, only new tokens come back, seeds reproduce, modes and the random state are restored."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distillens.generation import generate

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
