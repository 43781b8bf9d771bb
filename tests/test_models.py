"""Model loading: random init from configs, layer-subset students, errors, export, and the embedded teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillens import models
from distillens.export import export_student
from distillens.models import (
    DEFAULT_TEACHER,
    ModelSpec,
    check_hub_sources,
    default_teacher_dir,
    load_model,
    load_tokenizer,
    smollm2_gguf_path,
    student_from_teacher_layers,
)

VOCAB = 101
TINY = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_head": 4,
        "vocab_size": VOCAB,
        "n_positions": 64,
        "bos_token_id": VOCAB - 1,
        "eos_token_id": VOCAB - 1,
    },
}
DEPTH_KEY = {"llama": "num_hidden_layers", "gpt2": "n_layer"}
# where each family keeps its blocks, embeddings and final norm (written out here, independently of models.py)
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h"}
NON_BLOCK_MODULES = {
    "llama": ["model.embed_tokens", "model.norm", "lm_head"],
    "gpt2": ["transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"],
}
FAMILIES = list(TINY)


def tiny_spec(family: str, depth: int = 4, **fields) -> ModelSpec:
    return ModelSpec(config={**TINY[family], DEPTH_KEY[family]: depth}, **fields)


def tiny_teacher(family: str, depth: int = 4) -> torch.nn.Module:
    return load_model(tiny_spec(family, depth)).eval()


def module_state(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    return model.get_submodule(name).state_dict()


def checkpointing_enabled(model) -> bool:
    """transformers >= 5.22 renamed the flag; the old name still works there but warns."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- random init from a config -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_random_init_from_config_has_the_configured_shape(family):
    model = load_model(tiny_spec(family, depth=3))
    ids = torch.randint(0, VOCAB, (2, 5))  # (B, T)
    logits = model(ids).logits  # (B, T, V)
    assert model.config.model_type == family
    assert len(model.get_submodule(BLOCKS[family])) == 3
    assert model.get_input_embeddings().weight.shape == (VOCAB, 32)
    assert logits.shape == (2, 5, VOCAB)
    assert model.dtype == torch.float32


def test_random_init_respects_dtype():
    assert load_model(tiny_spec("llama", dtype="bfloat16")).dtype == torch.bfloat16


def test_config_without_known_model_type_is_rejected():
    with pytest.raises(ValueError, match="model_type"):
        load_model(ModelSpec(config={"hidden_size": 32}))
    with pytest.raises(ValueError, match="'no-such-family'"):
        load_model(ModelSpec(config={"model_type": "no-such-family"}))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, VOCAB, (2, 6))  # (B, T)
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_model(tiny_spec("llama", gradient_checkpointing=checkpointing))
        assert checkpointing_enabled(model) == checkpointing
        model(ids, labels=ids).loss.backward()
        gradients.append(model.get_submodule("model.layers.0.mlp.up_proj").weight.grad)
    torch.testing.assert_close(gradients[0], gradients[1])


# --- ModelSpec validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{}, {"source": "gpt2", "config": TINY["gpt2"]}, {"source": "gpt2", "init_from_teacher_layers": [0]}],
)
def test_spec_needs_exactly_one_origin(fields):
    with pytest.raises(ValueError, match="exactly one of source, config or init_from_teacher_layers"):
        ModelSpec(**fields)


def test_tokenizer_source_is_the_tokenizer_else_the_source():
    assert ModelSpec(source="org/model").tokenizer_source == "org/model"
    assert ModelSpec(source="org/model", tokenizer="org/tokenizer").tokenizer_source == "org/tokenizer"
    assert tiny_spec("llama").tokenizer_source is None  # a random init names no tokenizer of its own


def test_spec_is_built_from_yaml_by_jsonargparse():
    """LightningCLI builds specs from YAML through jsonargparse: nested config dicts and layer lists survive."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--student", type=ModelSpec)
    yaml = "student: {config: {model_type: llama, hidden_size: 64}, dtype: bfloat16, tokenizer: some/folder}"
    spec = parser.instantiate(parser.parse_string(yaml)).student
    assert spec == ModelSpec(
        config={"model_type": "llama", "hidden_size": 64}, dtype="bfloat16", tokenizer="some/folder"
    )
    spec = parser.instantiate(parser.parse_string("student: {init_from_teacher_layers: [0, 2]}")).student
    assert spec.init_from_teacher_layers == [0, 2]


def test_spec_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype='float64'"):
        ModelSpec(source="gpt2", dtype="float64")


def test_layer_subset_spec_needs_the_teacher():
    with pytest.raises(ValueError, match="teacher"):
        load_model(ModelSpec(init_from_teacher_layers=[0]))


# --- students from teacher layers ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_student_copies_the_chosen_blocks_embeddings_norm_and_head(family):
    teacher, kept = tiny_teacher(family, depth=4), [1, 3]
    student = load_model(ModelSpec(init_from_teacher_layers=kept), teacher=teacher)
    blocks = BLOCKS[family]
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(student.get_submodule(blocks)) == 2
    for new, old in enumerate(kept):
        assert_same_state(module_state(student, f"{blocks}.{new}"), module_state(teacher, f"{blocks}.{old}"))
    for name in NON_BLOCK_MODULES[family]:
        assert_same_state(module_state(student, name), module_state(teacher, name))
    teacher_storage = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_storage & {p.data_ptr() for p in student.parameters()}  # copies, not shared tensors


@pytest.mark.parametrize("family", FAMILIES)
def test_student_keeps_the_teachers_tied_head(family):
    teacher = tiny_teacher(family)
    student = student_from_teacher_layers(teacher, [0])
    assert teacher.lm_head.weight is teacher.get_input_embeddings().weight  # both tiny configs tie
    assert student.lm_head.weight is student.get_input_embeddings().weight


def test_student_of_untied_teacher_stays_untied():
    teacher = load_model(
        ModelSpec(config={**TINY["llama"], "num_hidden_layers": 2, "tie_word_embeddings": False})
    )
    student = student_from_teacher_layers(teacher, [1])
    assert student.lm_head.weight is not student.get_input_embeddings().weight
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_of_every_layer_reproduces_the_teacher_logits(family):
    teacher = tiny_teacher(family, depth=2)
    student = student_from_teacher_layers(teacher, [0, 1])
    ids = torch.randint(0, VOCAB, (3, 9))  # (B, T)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)  # (B, T, V)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_generates_with_a_renumbered_kv_cache(family):
    student = student_from_teacher_layers(tiny_teacher(family, depth=4), [1, 3])
    attention = [m.layer_idx for m in student.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    if family == "llama":
        assert attention == [0, 1]
    prompt = torch.randint(0, VOCAB, (2, 5))  # (B, T)
    options = {
        "attention_mask": torch.ones_like(prompt),
        "max_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": 0,
    }
    cached = student.generate(prompt, use_cache=True, **options)  # (B, T + 4)
    uncached = student.generate(prompt, use_cache=False, **options)
    assert cached.shape == (2, 9)
    assert torch.equal(cached, uncached)  # a KV cache indexed by wrong layer numbers would change the tokens


def test_student_subsets_per_layer_config_fields():
    teacher_config = {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "vocab_size": VOCAB,
        "use_sliding_window": True,
        "sliding_window": 4,
        "max_window_layers": 2,  # blocks 2 and 3 use sliding attention
    }
    teacher = load_model(ModelSpec(config=teacher_config))
    student = student_from_teacher_layers(teacher, [1, 2])
    assert student.config.layer_types == [teacher.config.layer_types[1], teacher.config.layer_types[2]]
    assert student.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("layers", [[], [0, 4], [-1, 2], [1, 1], [2, 1]])
def test_bad_layer_indices_name_the_teacher_depth(layers):
    with pytest.raises(ValueError, match=r"init_from_teacher_layers=.*teacher has 4"):
        student_from_teacher_layers(tiny_teacher("llama", depth=4), layers)


def test_unknown_block_layout_names_the_model_class():
    teacher = tiny_teacher("gpt2", depth=2)
    teacher.transformer.h = torch.nn.Sequential(*teacher.transformer.h)  # no ModuleList of blocks any more
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        student_from_teacher_layers(teacher, [0])


# --- sources: local folders, missing paths, hub ids, unsafe checkpoints --------------------------------------


@pytest.fixture
def exported(tmp_path, smollm2_tokenizer):
    """A tiny random Llama exported with the SmolLM2 tokenizer, as the CLI would export a student."""
    model = load_model(
        ModelSpec(config={**TINY["llama"], "num_hidden_layers": 2, "vocab_size": 49152})
    ).eval()
    return model, export_student(model, smollm2_tokenizer, tmp_path / "student")


def test_export_writes_safetensors_that_load_back(exported, smollm2_tokenizer):
    model, folder = exported
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    reloaded = load_model(ModelSpec(source=str(folder))).eval()
    ids = torch.randint(0, 49152, (2, 6))  # (B, T)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)  # (B, T, V)
    tokenizer = load_tokenizer(ModelSpec(source=str(folder)))
    assert tokenizer.eos_token_id == smollm2_tokenizer.eos_token_id == 2
    assert tokenizer("Hello world").input_ids == smollm2_tokenizer("Hello world").input_ids


def test_config_only_spec_takes_its_tokenizer_from_the_tokenizer_field(exported, smollm2_tokenizer):
    _, folder = exported
    tokenizer = load_tokenizer(tiny_spec("llama", tokenizer=str(folder)))
    assert tokenizer.vocab_size == smollm2_tokenizer.vocab_size
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_spec_without_any_tokenizer_source_is_rejected():
    with pytest.raises(ValueError, match="ModelSpec.tokenizer"):
        load_tokenizer(ModelSpec(init_from_teacher_layers=[0]))


def test_missing_local_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "student"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_model(ModelSpec(source=str(missing)))
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        load_model(ModelSpec(source=str(tmp_path / "model.gguf")))


def test_hub_id_offline_fails_with_one_line_naming_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "distillens-tests/no-such-model"
    connects = record_connections(monkeypatch)
    for load in (load_model, load_tokenizer):
        with pytest.raises(OSError, match=hub_id) as error:
            load(ModelSpec(source=hub_id))
        assert "\n" not in str(error.value)
    assert connects == []  # offline means no network attempt, so no retries to wait for


def _record_that_pickle_ran_code(marker: str) -> None:
    Path(marker).touch()


class _CodeInPickle:
    """An object whose unpickling runs a function: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_record_that_pickle_ran_code, (str(self.marker),))


def test_pickled_checkpoints_load_weights_only(tmp_path):
    model = load_model(tiny_spec("gpt2", depth=1))
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({**model.state_dict(), "payload": _CodeInPickle(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_model(ModelSpec(source=str(tmp_path)))
    assert not marker.exists()


# --- the embedded default teacher ----------------------------------------------------------------------------


def test_leftover_folder_without_config_is_reported(tmp_path):
    leftover = tmp_path / DEFAULT_TEACHER
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        default_teacher_dir(tmp_path)


@pytest.fixture(scope="session")
def converted_teacher(tmp_path_factory):
    """Convert the wheel's GGUF once per session into a fresh folder; keep the GGUF-loaded model as reference."""
    models_dir = tmp_path_factory.mktemp("models")
    loaded_from_gguf = []
    original = AutoModelForCausalLM.from_pretrained

    def recording_from_pretrained(*args, **kwargs):
        model = original(*args, **kwargs)
        if kwargs.get("gguf_file"):
            loaded_from_gguf.append(model)
        return model

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoModelForCausalLM, "from_pretrained", recording_from_pretrained)
        folder = default_teacher_dir(models_dir)
    assert len(loaded_from_gguf) == 1
    return models_dir, folder, loaded_from_gguf[0].eval()


@pytest.mark.slow
def test_converted_teacher_matches_the_gguf(converted_teacher):
    _, folder, gguf_model = converted_teacher
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits)  # (1, T, V)


@pytest.mark.slow
def test_converted_teacher_stops_at_im_end(converted_teacher):
    _, folder, _ = converted_teacher
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert AutoModelForCausalLM.from_pretrained(folder).generation_config.eos_token_id == 2
    assert load_tokenizer(folder).pad_token_id == 2


@pytest.mark.slow
def test_a_tiny_model_converts_only_the_teachers_tokenizer(converted_teacher, tmp_path, monkeypatch):
    """A config-built model borrowing SmolLM2's tokenizer needs neither the 517 MB teacher nor its 30 s conversion."""
    monkeypatch.setattr(models, "MODELS_DIR", tmp_path)
    spec = ModelSpec(config={"model_type": "llama", "vocab_size": 49152}, tokenizer=DEFAULT_TEACHER)
    tokenizer = load_tokenizer(spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{DEFAULT_TEACHER}-tokenizer"]
    assert not any(p.suffix == ".safetensors" for p in (tmp_path / f"{DEFAULT_TEACHER}-tokenizer").iterdir())
    reference = load_tokenizer(converted_teacher[1])  # the whole teacher's folder
    text = "<|im_start|>user\nThe capital of France is<|im_end|>"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert (
        (tokenizer.eos_token, tokenizer.pad_token_id)
        == (reference.eos_token, reference.pad_token_id)
        == ("<|im_end|>", 2)
    )
    assert tokenizer.chat_template == reference.chat_template
    models_dir, folder, _ = converted_teacher
    assert models.default_tokenizer_dir(models_dir) == folder  # a converted teacher serves its tokenizer


@pytest.mark.slow
def test_second_call_reuses_the_converted_folder(converted_teacher):
    models_dir, folder, _ = converted_teacher
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert default_teacher_dir(models_dir) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing converted again


@pytest.mark.slow
def test_default_teacher_spec_loads_the_converted_folder(converted_teacher, monkeypatch):
    models_dir, _, gguf_model = converted_teacher
    monkeypatch.setattr(models, "MODELS_DIR", models_dir)
    model = load_model(ModelSpec(source=DEFAULT_TEACHER, dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    embeddings = gguf_model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, embeddings.to(torch.bfloat16))
    assert load_tokenizer(ModelSpec(source=DEFAULT_TEACHER)).eos_token_id == 2


def test_smollm2_gguf_is_found_in_the_wheel():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.getsize(path) > 50_000_000


def test_hub_id_without_network_fails_in_seconds_saying_how_to_load_it_locally(monkeypatch, tmp_path):
    """No offline mode and a hub that does not answer the probe: every loader stops before the hub client's
    retries, with one line naming the id, a local folder and HF_HUB_OFFLINE=1 as the ways out."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("distillens.hub.hub_reachable", lambda: False)
    hub_id = "distillens-tests/no-such-model"
    connects = record_connections(monkeypatch)
    for load in (load_model, load_tokenizer):
        with pytest.raises(
            OSError, match=f"{hub_id}' is not a local folder and the Hugging Face hub is unreachable"
        ):
            load(ModelSpec(source=hub_id))
    with pytest.raises(OSError, match=r"model.student.adapter: .* HF_HUB_OFFLINE=1"):
        check_hub_sources(ModelSpec(source=str(tmp_path), adapter=hub_id), "model.student")
    assert connects == []  # stopped before the hub client tried (and retried) a connection


def record_connections(monkeypatch) -> list:
    """Every socket connection attempted from here on (refused, so a test never reaches a network)."""
    import socket

    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts
