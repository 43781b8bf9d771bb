"""Tokenisation for teacher forcing: prompt and response ids with an exact boundary, the length filters, what they
did to a split (`SplitStats`, kept in the cache beside the ids), and the tokenizer's share of the cache key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase


@dataclass
class SplitStats:
    """What happened to the rows of one split; every row read ends up in exactly one count."""

    rows_read: int = 0
    bad_rows_skipped: int = 0
    empty_responses_dropped: int = 0  # nothing to learn or score: every reference blank
    in_other_split: int = 0  # went to the other side of the val_size split
    over_max_samples: int = 0
    long_prompts_dropped: int = 0
    short_references_dropped: int = 0  # test sets with a min_reference_tokens
    kept: int = 0
    prompts_truncated: int = 0  # among the kept (test sets: long prompts are cut, not dropped)
    responses_truncated: int = 0  # among the kept


@dataclass
class Tokenised:
    """Token ids of the kept examples, where each prompt ends, which examples were kept, and how many were cut."""

    sequences: list[list[int]] = field(default_factory=list)  # prompt + response + EOS
    prompt_lengths: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # indices into the input examples
    truncated: int = 0
    cut_prompts: set[int] = field(
        default_factory=set
    )  # indices (as `kept`) of prompts cut to max_prompt_length


def tokenize_examples(
    prompts: Sequence[str],
    responses: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_special_tokens: bool,
    max_length: int,
    max_prompt_length: int,
    truncate_prompts: bool = False,
) -> Tokenised:
    """Tokenise prompt/response pairs for teacher forcing, dropping long prompts and cutting long responses.

    Prompt and response are tokenised separately and concatenated, so the boundary is exact by construction even
    where BPE would merge across it (a prompt ending in a space, say), and training sees the very prompt ids
    that generation will be given. The prompt gets the tokenizer's special tokens (a BOS for Llama-2-style
    tokenizers) unless a chat template already wrote them. Prompts over `max_prompt_length` are dropped, or, with
    `truncate_prompts` (evaluation sets, as the paper's protocol), cut to their first `max_prompt_length` tokens;
    responses are cut to fit `max_length`, and a cut response loses its EOS (the model should not learn to stop).
    """
    prompt_ids = tokenizer(list(prompts), add_special_tokens=prompt_special_tokens)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    result = Tokenised()
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if len(prompt) > max_prompt_length:
            if not truncate_prompts:
                continue
            prompt = prompt[:max_prompt_length]
            result.cut_prompts.add(index)
        target = [*response, tokenizer.eos_token_id][: max_length - len(prompt)]
        result.truncated += len(target) <= len(response)
        result.sequences.append([*prompt, *target])
        result.prompt_lengths.append(len(prompt))
        result.kept.append(index)
    return result


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of everything that changes the ids: vocabulary and merges, special tokens, added BOS, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    parts = [
        type(tokenizer).__name__,
        str(tokenizer.name_or_path),
        vocabulary,
        str((tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer("x")["input_ids"])),
        str(getattr(tokenizer, "chat_template", None)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
