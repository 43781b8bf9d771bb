"""What an exported student folder holds besides its weights: the prompt format it was trained on, a true
model_max_length, and no overwriting of a folder unless asked."""

from __future__ import annotations

import copy
import json

import pytest
from reference import tiny_llama
from tokenizers import processors
from transformers import AutoConfig, AutoTokenizer

from distillens.data.formats import Example
from distillens.data.templates import make_prompt_renderer
from distillens.data.tokenisation import tokenize_examples
from distillens.export import export_student, export_trained_student
from distillens.models import ModelSpec, load_model

TEMPLATES = ["alpaca", "chat", 'Question: {instruction}\n"Réponse" \\ {input}:']
INSTRUCTION = "Name three primary colours."


@pytest.fixture(scope="module")
def student():
    """A tiny random Llama over SmolLM2's vocabulary, with 512 positions."""
    return load_model(ModelSpec(**tiny_llama(2, 32, 49152))).eval()


@pytest.fixture(scope="module")
def bos_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer made to add a BOS before every text, as Llama-2's and TinyLlama's do (SmolLM2's adds
    nothing, so it alone cannot show a template that drops the BOS)."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "bos_tokenizer"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_the_exported_chat_template_gives_the_training_prompt(
    template, tokenizer_name, student, tmp_path, request
):
    """A chat pipeline renders messages with apply_chat_template(add_generation_prompt=True): it must give the
    prompt text, and the prompt ids, the data module trained the student on (the BOS of a tokenizer that adds one
    included: apply_chat_template adds no special tokens of its own)."""
    tokenizer = request.getfixturevalue(tokenizer_name)
    folder = export_trained_student(student, tokenizer, tmp_path / "out", template=template)
    exported = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": INSTRUCTION}]
    trained_prompt = make_prompt_renderer(template, tokenizer)(Example(INSTRUCTION, "", "Red.", ("Red.",)))
    trained = tokenize_examples(
        [trained_prompt], ["Red."], tokenizer, prompt_special_tokens=template != "chat",
        max_length=128, max_prompt_length=96,
    )  # fmt: skip
    prompt_ids = trained.sequences[0][: trained.prompt_lengths[0]]
    if tokenizer_name == "bos_tokenizer" and template != "chat":
        assert prompt_ids[0] == tokenizer.bos_token_id  # the case this tokenizer is here for
        trained_prompt = tokenizer.bos_token + trained_prompt
    rendered = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == trained_prompt
    ids = exported.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == prompt_ids
    assert json.loads((folder / "config.json").read_text())["distillens_prompt_template"] == template
    assert AutoConfig.from_pretrained(folder).distillens_prompt_template == template


def test_an_alpaca_student_refuses_conversations_it_never_saw(student, smollm2_tokenizer, tmp_path):
    folder = export_trained_student(student, smollm2_tokenizer, tmp_path / "out", template="alpaca")
    exported = AutoTokenizer.from_pretrained(folder)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": INSTRUCTION}]
    with pytest.raises(Exception, match="trained on single-turn prompts of the alpaca template"):
        exported.apply_chat_template(system, tokenize=False, add_generation_prompt=True)


def test_the_exported_model_max_length_is_the_models_positions(student, smollm2_tokenizer, tmp_path):
    """SmolLM2's tokenizer from GGUF claims 1e30 tokens; the folder says what the model takes: its positions."""
    assert smollm2_tokenizer.model_max_length > 1e20
    folder = export_trained_student(student, smollm2_tokenizer, tmp_path / "out", template="alpaca")
    assert (
        AutoTokenizer.from_pretrained(folder).model_max_length
        == student.config.max_position_embeddings
        == 2048
    )
    assert smollm2_tokenizer.model_max_length > 1e20  # the caller's tokenizer is left as it was


def test_a_non_empty_folder_is_replaced_only_when_asked_and_only_if_it_holds_an_export(
    student, smollm2_tokenizer, tmp_path
):
    folder = export_student(student, smollm2_tokenizer, tmp_path / "out")
    stale = folder / "model-00002-of-00002.safetensors"  # an earlier export saved in shards
    stale.write_text("from an earlier export")
    with pytest.raises(FileExistsError, match="is not empty; .* --overwrite"):
        export_student(student, smollm2_tokenizer, folder)
    export_student(student, smollm2_tokenizer, folder, overwrite=True)
    assert (folder / "config.json").is_file() and not stale.exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("not an export")
    with pytest.raises(FileExistsError, match="holds no earlier export"):
        export_student(student, smollm2_tokenizer, other, overwrite=True)
    assert (other / "mine.txt").is_file()


@pytest.mark.parametrize("other", ["notes.txt", "subdir/data.bin"])
def test_overwrite_refuses_an_export_folder_that_holds_anything_else(
    other, student, smollm2_tokenizer, tmp_path
):
    """An export is replaced as a whole: files beside it that no export writes would be deleted with it."""
    folder = export_student(student, smollm2_tokenizer, tmp_path / "out")
    (folder / other).parent.mkdir(exist_ok=True)
    (folder / other).write_text("the user's")
    with pytest.raises(FileExistsError, match=f"holds {other.split('/')[0]}.* not written by an export"):
        export_student(student, smollm2_tokenizer, folder, overwrite=True)
    assert (folder / other).read_text() == "the user's" and (folder / "config.json").is_file()


def test_overwrite_replaces_a_merged_export_and_an_adapter_export(student, smollm2_tokenizer, tmp_path):
    """Every file either kind of export writes (PEFT's model card README.md included) may be replaced."""
    from distillens.lora import LoraSpec, add_lora

    adapted = add_lora(load_model(ModelSpec(**tiny_llama(2, 32, 49152))), LoraSpec(r=2))
    folder = export_trained_student(
        adapted, smollm2_tokenizer, tmp_path / "out", template="chat", adapter_only=True
    )
    assert (folder / "README.md").is_file()
    export_trained_student(student, smollm2_tokenizer, folder, template="chat", overwrite=True)
    assert (folder / "config.json").is_file() and not (folder / "adapter_config.json").exists()
    export_trained_student(
        adapted, smollm2_tokenizer, folder, template="chat", adapter_only=True, overwrite=True
    )
    assert (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").exists()
