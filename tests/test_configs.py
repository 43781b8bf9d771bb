"""Every shipped config parses with the real CLI parser, and the paper's setups say what the paper says.

Configs are only *parsed* (``distillens fit --config ... --print_config``): no model is built, no data is read and the
hub is never contacted, so the GPU setups are checked on any machine. Trainer overlays (configs/trainer/) are meant
as a second ``--config`` and are parsed on top of configs/tiny.yaml. The expected values below are copied from the
paper and from the reference run scripts (DistillLens repository, scripts/ and arguments.py, commit 3336a20), not
from the configs, so that a later edit of a config cannot drift from them silently.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from helpers import REPO

from distillens.callbacks import accumulation_for
from distillens.lightning_cli import run_cli
from distillens.objective import LayerPairs

CONFIG_DIR = REPO / "configs"
OVERLAY_DIR = CONFIG_DIR / "trainer"
OVERLAY_BASE = CONFIG_DIR / "tiny.yaml"
ON_POLICY_DIR = CONFIG_DIR / "onpolicy"  # on-policy overlays, each for the setup of its name
PRESET_DIR = CONFIG_DIR / "replicate"  # presets (*.yaml right there) are no CLI configs: test_replicate
DATA_DIR = CONFIG_DIR / "data"  # data overlays (other splits of the bundled data), on any setup


@dataclass(frozen=True)
class PaperPairs:
    """One row of the paper's layer-pair table (hidden-state indices, 0 = embeddings) and the models' depths."""

    student: list[int]
    teacher: list[int]
    student_depth: int
    teacher_depth: int


PAPER_PAIRS = {
    "gpt2.yaml": PaperPairs([2, 4, 6, 8, 10], [8, 16, 24, 32, 40], 12, 48),
    "gpt2-medium.yaml": PaperPairs([4, 8, 12, 16, 20], [8, 16, 24, 32, 40], 24, 48),
    "llama.yaml": PaperPairs([4, 7, 11, 15, 18], [5, 10, 16, 21, 26], 22, 32),
    "qwen.yaml": PaperPairs([6, 11, 17, 22], [7, 14, 22, 29], 28, 36),
}
DISTILLLENS_LOSS = {  # the paper's DistillLens runs
    "ce_weight": 0.0,
    "kd_weight": 1.0,
    "kd_divergence": "reverse_kl",
    "lens_weight": 1.0,
    "lens_divergence": "jsd",
    "lens_params": {"beta": 0.5},
    "temperature": 1.0,
}
KD_BASELINE_LOSS = {"ce_weight": 0.5, "kd_weight": 0.5, "kd_divergence": "forward_kl", "lens_weight": 0.0}
GPU_SETUPS = [*PAPER_PAIRS, "kd.yaml", "sft.yaml"]


@dataclass(frozen=True)
class ReferenceRun:
    """What a reference run script sets: peak learning rate, sequences per optimizer step on its 4 GPUs, epochs,
    gradient checkpointing, and the student's LoRA (None: full fine-tuning)."""

    lr: float
    sequences_on_4_gpus: int
    epochs: int
    gradient_checkpointing: bool = False
    lora: dict[str, float] | None = None


REFERENCE_RUNS = {
    "gpt2.yaml": ReferenceRun(lr=2e-4, sequences_on_4_gpus=16, epochs=20),
    "gpt2-medium.yaml": ReferenceRun(lr=5e-5, sequences_on_4_gpus=16, epochs=20),
    "kd.yaml": ReferenceRun(lr=2e-4, sequences_on_4_gpus=16, epochs=20),
    "sft.yaml": ReferenceRun(lr=5e-4, sequences_on_4_gpus=8, epochs=20),
    "llama.yaml": ReferenceRun(lr=5e-6, sequences_on_4_gpus=4, epochs=10, gradient_checkpointing=True),
    "qwen.yaml": ReferenceRun(
        lr=1e-4,
        sequences_on_4_gpus=4,
        epochs=10,
        gradient_checkpointing=True,
        lora={"r": 8, "alpha": 32.0, "dropout": 0.1, "target_modules": None},
    ),  # fmt: skip
}
REFERENCE_COMMON = {  # every reference run script (and arguments.py's defaults where a script sets nothing)
    "seed_everything": 10,
    "trainer.max_epochs": None,  # per run, above
    "trainer.gradient_clip_val": 1.0,
    "trainer.accumulate_grad_batches": 1,  # SequencesPerStep sets it from the device count
    "trainer.check_val_every_n_epoch": 1,
    "model.optimizer.weight_decay": 0.01,
    "model.optimizer.warmup": 0.0,
    "model.optimizer.min_lr": 1e-7,
    "data.max_length": 512,
    "data.max_prompt_length": 256,
}
REFERENCE_GENERATION = {  # arguments.py's generation arguments, which the eval scripts leave unchanged
    "do_sample": True,
    "top_k": 0,
    "top_p": 1.0,
    "temperature": 1.0,
    "no_repeat_ngram_size": 6,
    "max_new_tokens": 256,  # prompts left-padded to 256 tokens, generation up to a total of 512
    "seeds": [10, 20, 30, 40, 50],
    "every_n_val": 1,  # validation ROUGE-L at every validation, i.e. once per epoch
}
REFERENCE_MIN_REFERENCE_TOKENS = {"sni": 11, "unni": 11}
EVAL_SETS = ["dolly", "selfinst", "vicuna", "sni", "unni"]  # MiniLLM-layout sets users place under data/eval/
DOLLY = "databricks/databricks-dolly-15k"
RUN_CALLBACKS = {
    "lightning.pytorch.callbacks.ModelCheckpoint",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "distillens.callbacks.TokenThroughput",
    "distillens.callbacks.ExportStudent",
}


# ------------------------------------------------------------------------------------------------- helpers


def config_files() -> list[Path]:
    """Every YAML file under configs/ that `--config` takes, whoever wrote it and whenever it appeared (the
    replication presets, read by scripts/replicate.py, are parsed by tests/test_replicate.py)."""
    return sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.parent != PRESET_DIR)


def config_arguments(path: Path) -> tuple[str, ...]:
    """The `--config` arguments that use a file as intended: overlays go on top of the tiny base config."""
    overlays = (
        OVERLAY_DIR,
        PRESET_DIR,
        ON_POLICY_DIR,
        DATA_DIR,
    )  # PRESET_DIR: the method and recipe overlays
    if any(folder in path.parents for folder in overlays):
        return ("--config", str(OVERLAY_BASE), "--config", str(path))
    return ("--config", str(path))


@functools.cache
def cli_output(*args: str) -> str:
    """What `distillens fit ARGS` prints before exiting with success (help, --print_config); parser errors fail."""
    out, err = io.StringIO(), io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["distillens"]),  # pytest's own arguments are not the CLI's
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as stop,
    ):
        run_cli(["fit", *args])
    assert stop.value.code in (0, None), f"distillens fit {' '.join(args)} failed: {err.getvalue().strip()}"
    return out.getvalue()


def printed_config(*config_args: str) -> dict[str, Any]:
    """The full configuration the CLI would run with, as `--print_config` writes it."""
    return yaml.safe_load(cli_output(*config_args, "--print_config"))


def setup_config(name: str) -> dict[str, Any]:
    """The printed config of one top-level file of configs/, e.g. "gpt2.yaml"."""
    return printed_config("--config", str(CONFIG_DIR / name))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are leaves."""
    leaves = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(flatten(value, f"{path}."))
        else:
            leaves[path] = value
    return leaves


def without(config: dict[str, Any], *paths: str) -> dict[str, Any]:
    """The flattened config minus the leaves under the given dotted paths."""
    return {
        key: value
        for key, value in flatten(config).items()
        if not any(key == path or key.startswith(f"{path}.") for path in paths)
    }


# ------------------------------------------------------------------------------------------------- every config


@pytest.mark.parametrize("path", config_files(), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_parses_and_its_printed_form_round_trips(path: Path, tmp_path: Path) -> None:
    printed = cli_output(*config_arguments(path), "--print_config")
    assert {"trainer", "model", "data"} <= set(yaml.safe_load(printed)), f"{path}: incomplete printed config"
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    assert cli_output("--config", str(saved), "--print_config") == printed


def test_every_config_file_is_among_the_parsed_ones() -> None:
    """The parse test runs on config_files(): every file under configs/ that a --config could name (YAML or JSON,
    in any folder) must be among them, so a config added later cannot escape it."""
    on_disk = {
        p
        for p in CONFIG_DIR.rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".yml", ".json") and p.parent != PRESET_DIR
    }
    assert set(config_files()) == on_disk, sorted(str(p) for p in on_disk ^ set(config_files()))
    names = {str(p.relative_to(CONFIG_DIR)) for p in config_files()}
    assert {"default.yaml", "tiny.yaml", *GPU_SETUPS, "trainer/ddp.yaml", "trainer/fsdp.yaml"} <= names


@pytest.mark.parametrize("path", sorted(OVERLAY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_trainer_overlay_changes_only_the_options_it_names(path: Path) -> None:
    overlay = yaml.safe_load(path.read_text())
    named = [
        f"{section}.{key}" if isinstance(options, dict) else section
        for section, options in overlay.items()
        for key in (options if isinstance(options, dict) else [None])
    ]
    base = flatten(printed_config("--config", str(OVERLAY_BASE)))
    combined = flatten(printed_config(*config_arguments(path)))
    changed = {key for key in base.keys() | combined.keys() if base.get(key, "<absent>") != combined.get(key)}
    assert changed, f"{path.name} changes nothing"
    stray = sorted(key for key in changed if not any(key == n or key.startswith(f"{n}.") for n in named))
    assert not stray, f"{path.name} changes options it does not name: {stray}"


@pytest.mark.parametrize("overlay", sorted(OVERLAY_DIR.glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("name", PAPER_PAIRS)
def test_paper_setup_takes_each_trainer_overlay_without_changing_the_model(name: str, overlay: Path) -> None:
    alone = setup_config(name)
    combined = printed_config("--config", str(CONFIG_DIR / name), "--config", str(overlay))
    assert (combined["model"], combined["data"]) == (alone["model"], alone["data"])
    assert combined["trainer"] != alone["trainer"]


@pytest.mark.parametrize("path", sorted(ON_POLICY_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_on_policy_overlay_changes_only_the_on_policy_options_and_run_name_of_its_setup(path: Path) -> None:
    """configs/onpolicy/<setup>.yaml goes on configs/<setup>.yaml: it turns on model.on_policy and names the run
    apart (and runs the teacher live where the setup caches its targets: new sequences), and leaves the setup's
    model, data and trainer otherwise as they are."""
    setup = flatten(setup_config(path.name))
    combined = flatten(printed_config("--config", str(CONFIG_DIR / path.name), "--config", str(path)))
    changed = {
        key for key in setup.keys() | combined.keys() if setup.get(key, "<absent>") != combined.get(key)
    }
    assert {key.rsplit(".", 1)[0] for key in changed} <= {
        "model.on_policy",
        "trainer.logger.init_args",
        "model.teacher_targets",
    }
    assert {key for key in changed if key.startswith("model.teacher_targets")} <= {
        "model.teacher_targets.kind"
    }
    assert combined.get("model.teacher_targets.kind") in (None, "live")
    assert combined["model.on_policy.student_fraction"] > 0
    assert combined["trainer.logger.init_args.name"] != setup["trainer.logger.init_args.name"]


def test_ddp_overlay_turns_on_data_parallelism_on_every_device() -> None:
    trainer = printed_config(*config_arguments(OVERLAY_DIR / "ddp.yaml"))["trainer"]
    assert (trainer["strategy"], trainer["devices"]) == ("ddp", "auto")


# ------------------------------------------------------------------------------------------------- the paper's setups


@pytest.mark.parametrize("name", PAPER_PAIRS)
def test_paper_setup_uses_the_papers_layer_pairs(name: str) -> None:
    layers = setup_config(name)["model"]["layers"]
    paper = PAPER_PAIRS[name]
    assert (layers["student"], layers["teacher"]) == (paper.student, paper.teacher)
    # and the module will accept them once the real models (of the paper's depths) are built
    assert LayerPairs(**layers).resolve(paper.student_depth, paper.teacher_depth) == (
        paper.student,
        paper.teacher,
    )


@pytest.mark.parametrize("name", PAPER_PAIRS)
def test_paper_setup_uses_the_papers_distilllens_loss(name: str) -> None:
    loss = setup_config(name)["model"]["loss"]
    assert {key: loss[key] for key in DISTILLLENS_LOSS} == DISTILLLENS_LOSS
    assert loss["mse_weight"] == 0.0


@pytest.mark.parametrize("name", GPU_SETUPS)
def test_gpu_setup_follows_the_run_conventions(name: str) -> None:
    config = setup_config(name)
    trainer, data = config["trainer"], config["data"]
    assert (trainer["accelerator"], trainer["precision"]) == ("gpu", "bf16-mixed")
    logger = trainer["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert {k: logger["init_args"][k] for k in ("save_dir", "name", "version")} == {
        "save_dir": "logs",
        "name": Path(name).stem,
        "version": "",
    }
    assert logger["init_args"]["default_hp_metric"] is False  # no placeholder hp_metric = -1 chart
    callbacks = {callback["class_path"]: callback.get("init_args", {}) for callback in trainer["callbacks"]}
    assert callbacks.keys() >= RUN_CALLBACKS
    assert callbacks["lightning.pytorch.callbacks.ModelCheckpoint"]["save_last"] is True
    assert (data["train"], data["val_size"]) == (DOLLY, 1000)
    assert data["test"] == [f"data/eval/{eval_set}/valid.jsonl" for eval_set in EVAL_SETS]


def test_llama_setup_checkpoints_student_activations() -> None:
    assert setup_config("llama.yaml")["model"]["student"]["gradient_checkpointing"] is True


def test_kd_baseline_differs_from_the_gpt2_setup_by_its_objective_only() -> None:
    kd, gpt2 = setup_config("kd.yaml"), setup_config("gpt2.yaml")
    loss = kd["model"]["loss"]
    assert {key: loss[key] for key in KD_BASELINE_LOSS} == KD_BASELINE_LOSS
    objective = ("model.loss", "model.layers", "trainer.logger.init_args.name")
    assert without(kd, *objective) == without(gpt2, *objective)


def test_sft_baseline_trains_the_gpt2_student_alone_on_cross_entropy() -> None:
    sft, gpt2 = setup_config("sft.yaml"), setup_config("gpt2.yaml")
    loss = sft["model"]["loss"]
    assert sft["model"]["teacher"] is None
    assert loss["ce_weight"] > 0
    assert (loss["kd_weight"], loss["lens_weight"], loss["mse_weight"]) == (0.0, 0.0, 0.0)
    # the reference's SFT script differs from the DistillLens one by its learning rate and batch too
    differences = ("model.optimizer.lr", "data.batch_size", "trainer.callbacks")
    objective = ("model.loss", "model.layers", "model.teacher", "trainer.logger.init_args.name", *differences)
    assert without(sft, *objective) == without(gpt2, *objective)
    sft_callbacks = {c["class_path"]: c.get("init_args") for c in sft["trainer"]["callbacks"]}
    gpt2_callbacks = {c["class_path"]: c.get("init_args") for c in gpt2["trainer"]["callbacks"]}
    sft_callbacks.pop(SEQUENCES), gpt2_callbacks.pop(SEQUENCES)
    assert sft_callbacks == gpt2_callbacks


# ------------------------------------------------------------------------------------------------- the reference's runs

SEQUENCES = "distillens.callbacks.SequencesPerStep"


def callback_init(config: dict[str, Any], class_path: str) -> dict[str, Any]:
    """The init_args of the one callback of a printed config with this class path."""
    found = [c.get("init_args", {}) for c in config["trainer"]["callbacks"] if c["class_path"] == class_path]
    assert len(found) == 1, f"{class_path}: {len(found)} such callbacks"
    return found[0]


@pytest.mark.parametrize("name", REFERENCE_RUNS)
def test_paper_setup_has_the_reference_run_scripts_values(name: str) -> None:
    config, run = setup_config(name), REFERENCE_RUNS[name]
    leaves = flatten(config)
    expected = REFERENCE_COMMON | {"trainer.max_epochs": run.epochs, "model.optimizer.lr": run.lr}
    assert {key: leaves.get(key, "<absent>") for key in expected} == expected
    student = config["model"]["student"]
    assert student["gradient_checkpointing"] is run.gradient_checkpointing
    assert student["lora"] == run.lora


@pytest.mark.parametrize("gpus", [1, 2, 4])
@pytest.mark.parametrize("name", REFERENCE_RUNS)
def test_paper_setup_keeps_the_reference_sequences_per_step_on_any_gpu_count(name: str, gpus: int) -> None:
    config, run = setup_config(name), REFERENCE_RUNS[name]
    sequences, batch_size = callback_init(config, SEQUENCES)["sequences"], config["data"]["batch_size"]
    assert sequences == run.sequences_on_4_gpus
    assert batch_size * 4 == sequences, (
        "the reference's 4 GPUs accumulate nothing: its batch is 4 GPU batches"
    )
    assert accumulation_for(sequences, batch_size, gpus) == {1: 4, 2: 2, 4: 1}[gpus]


@pytest.mark.parametrize("name", REFERENCE_RUNS)
def test_paper_setup_keeps_the_checkpoint_with_the_best_validation_rouge(name: str) -> None:
    config = setup_config(name)
    checkpoint = callback_init(config, "lightning.pytorch.callbacks.ModelCheckpoint")
    assert (checkpoint["monitor"], checkpoint["mode"], checkpoint["save_last"]) == ("val/rougeL", "max", True)
    assert "val/rougeL" in checkpoint["filename"]
    assert config["model"]["generation"]["metrics"][0] == "rougeL"


@pytest.mark.parametrize("name", REFERENCE_RUNS)
def test_paper_setup_generates_under_the_reference_protocol(name: str) -> None:
    config = setup_config(name)
    generation = config["model"]["generation"]
    assert {key: generation[key] for key in REFERENCE_GENERATION} == REFERENCE_GENERATION
    assert generation["max_prompts"] in (None, 960)  # the reference's --dev-num: 1000 (all), or 960 for Qwen
    assert config["data"]["min_reference_tokens"] == REFERENCE_MIN_REFERENCE_TOKENS


def test_qwen_setup_distils_base_models_into_a_lora_student_with_an_adapted_teacher() -> None:
    model = setup_config("qwen.yaml")["model"]
    assert (model["teacher"]["source"], model["student"]["source"]) == (
        "Qwen/Qwen2.5-3B",
        "Qwen/Qwen2.5-1.5B",
    )
    assert model["teacher"]["adapter"] and "lora" not in model["teacher"]  # a frozen teacher takes no LoRA
    assert setup_config("qwen.yaml")["model"]["generation"]["max_prompts"] == 960  # --dev-num 960


# ------------------------------------------------------------------------------------------------- --help

OPTION_LINE = re.compile(r"^  (--[\w.+-]+)(.*)$")
TYPE_NOTE = "(type:"  # jsonargparse appends "(type: ..., default: ...)" to every help text, even an empty one


def option_descriptions(help_text: str) -> dict[str, str]:
    """Each option of an argparse help page -> its description, without jsonargparse's "(type: ...)" note."""
    texts: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if match := OPTION_LINE.match(line):
            current, rest = match.groups()
            # "--opt METAVAR    help" or "--opt  help": the help starts after a run of two or more spaces
            parts = re.split(r"\s{2,}", rest, maxsplit=1) if re.match(r"\s{2,}", rest) is None else ["", rest]
            texts[current] = parts[1] if len(parts) > 1 else ""
        elif current is not None and line.startswith("    "):
            texts[current] += " " + line.strip()
        else:
            current = None
    return {option: text.split(TYPE_NOTE)[0].strip() for option, text in texts.items()}


def test_every_model_and_data_option_has_a_help_text() -> None:
    groups = ("--model.", "--data.")
    descriptions = option_descriptions(cli_output("--help"))
    # dataclass-typed options (model.loss, model.layers, ...) list their fields on their own help page
    nested_pages = [
        option for option in descriptions if option.startswith(groups) and option.endswith(".help")
    ]
    for page in nested_pages:
        descriptions |= option_descriptions(cli_output(page))
    expected_somewhere = {
        "--data.train",
        "--model.student.source",
        "--model.loss.kd_weight",
        "--model.layers.student",
    }
    assert expected_somewhere <= descriptions.keys(), "the help pages were not parsed"
    undocumented = sorted(
        option for option, text in descriptions.items() if option.startswith(groups) and not text
    )
    assert not undocumented, f"options without a help text in `distillens fit --help`: {undocumented}"


def test_the_embedded_default_draws_the_lens_diagnostics_figure() -> None:
    """make train shows the paper's Figure 1 in TensorBoard, on one validation batch (its cost stays small)."""
    callbacks = {
        c["class_path"]: c.get("init_args", {}) for c in setup_config("default.yaml")["trainer"]["callbacks"]
    }
    assert callbacks.keys() >= RUN_CALLBACKS | {"distillens.callbacks.LensDiagnostics"}
    assert callbacks["distillens.callbacks.LensDiagnostics"]["max_batches"] == 1
