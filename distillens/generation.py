"""Generation: a model answering a batch of left-padded prompts, under settings and a seed that nothing else moves.

Evaluation (``evaluation.GenerationEvaluator``), on-policy training (``onpolicy.roll_out``), the lens diagnostics and
the callbacks all make a model answer prompts through here. Every sampling knob is pinned (``generation_config``),
so a checkpoint's own generation_config cannot change what is measured or trained on; a seeded generation forks the
random state, so it leaves the caller's stream (dropout, data order) where it was; the model runs in eval mode and
gets its mode back. Under data parallelism every rank steps until all are done (``several_ranks``), as a sharded
model's every forward is a collective. Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


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
    return decoded_answers(tokenizer, new_tokens)[0]


def decoded_answers(
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

    The common core of answering (``generate`` and ``evaluation.GenerationEvaluator``, which decode them) and of
    on-policy training (``onpolicy``, which supervises them). With a ``seed``, samples are reproducible and the caller's RNG state is left untouched; the
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
