"""Prompt templates: an `Example` rendered as the prompt text the model is given (Alpaca, chat, or a user string)."""

from __future__ import annotations

import json
import string
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from distillens.data.formats import Example

# The Alpaca prompt (Stanford Alpaca, github.com/tatsu-lab/stanford_alpaca, Apache-2.0), which the paper's data
# (MiniLLM's Dolly and evaluation sets) uses: one variant with an input paragraph, one without.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATE_FIELDS = {"instruction", "input"}


def validate_template(template: str) -> None:
    """Reject a template string early (at construction, before any data is read)."""
    if template in ("alpaca", "chat"):
        return
    if "{" not in template:
        raise ValueError(
            f"template {template!r}: use 'alpaca', 'chat' or a string with an {{instruction}} placeholder"
        )
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ValueError(f"template {template!r}: not a valid format string ({error})") from None
    if unknown := fields - TEMPLATE_FIELDS:
        raise ValueError(
            f"template {template!r}: unknown placeholder(s) {sorted(unknown)}; use {{instruction}}, {{input}}"
        )
    if "instruction" not in fields:
        raise ValueError(f"template {template!r}: needs an {{instruction}} placeholder")


def make_prompt_renderer(template: str, tokenizer: PreTrainedTokenizerBase) -> Callable[[Example], str]:
    """A function Example -> prompt text for "alpaca", "chat" (the tokenizer's chat template) or a user string."""
    validate_template(template)
    if template == "alpaca":
        return render_alpaca
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template 'chat': tokenizer {tokenizer.name_or_path!r} has no chat template")
        return lambda example: render_chat(example, tokenizer)
    return lambda example: render_string(example, template)


def render_alpaca(example: Example) -> str:
    """Alpaca's prompt, in its no-input variant when the row has no input."""
    return render_string(example, ALPACA_WITH_INPUT if example.input else ALPACA_NO_INPUT)


def render_string(example: Example, template: str) -> str:
    """A `str.format` template with {instruction} and {input} (validated by `validate_template`)."""
    return template.format(instruction=example.instruction, input=example.input)


def render_chat(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    """The conversation up to the assistant's turn, ending with the template's generation prompt."""
    user_turn = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    messages = list(example.messages) or [{"role": "user", "content": user_turn}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_template_for(template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """A Jinja chat template giving a conversation exactly the prompt training gave its rows, for export.

    Then ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` (what a chat pipeline calls)
    prompts the exported student as it was trained. "chat" is the tokenizer's own template. "alpaca" and a user
    string render one user message as the instruction, with no input (the no-input variant), preceded and
    followed by whatever special tokens the tokenizer adds to a prompt (a BOS), as training tokenised it; a
    closing assistant message is followed by EOS, as training targets were. Other conversations (a system
    message, several turns) were never trained on: the template refuses them.
    """
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"template 'chat': tokenizer {tokenizer.name_or_path!r} has no chat template")
        return tokenizer.chat_template
    validate_template(template)
    text = ALPACA_NO_INPUT if template == "alpaca" else template
    prefix, suffix = _added_special_text(tokenizer)
    pieces = [_jinja_string(prefix)]
    for literal, field, _, _ in string.Formatter().parse(text):
        pieces.append(_jinja_string(literal))
        if field == "instruction":
            pieces.append("messages[0]['content']")
        # {input}: the rows' no-input rendering, an empty string
    pieces.append(_jinja_string(suffix))
    prompt = " + ".join(piece for piece in pieces if piece != '""')
    refusal = (
        f"this model was trained on single-turn prompts of the {template if template == 'alpaca' else 'configured'} "
        "template: one user message, optionally followed by the assistant's answer"
    )
    return (
        "{%- if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user' "
        "or (messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
        f"{{{{- raise_exception({_jinja_string(refusal)}) -}}}}"
        "{%- endif -%}"
        f"{{{{- {prompt} -}}}}"
        "{%- if messages | length == 2 -%}{{- messages[1]['content'] + eos_token -}}{%- endif -%}"
    )


def _added_special_text(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The text of the special tokens the tokenizer adds before and after a prompt (Llama-2's BOS: "<s>", "")."""
    with_special = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    start = next(
        i for i in range(len(with_special) - len(bare) + 1) if with_special[i : i + len(bare)] == bare
    )
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False) if ids else ""  # noqa: E731
    return decode(with_special[:start]), decode(with_special[start + len(bare) :])


def _jinja_string(text: str) -> str:
    """A Jinja string literal of ``text`` (JSON's escapes are Jinja's; non-ASCII characters stay as they are)."""
    return json.dumps(text, ensure_ascii=False)
