"""The real CLI on configs/tiny.yaml: fit, validate, test, export, help pages, and one-line errors for bad input.

Runs are driven in-process through `distillens.cli` (importing torch and Lightning again in a subprocess costs
~10 s); the installed entry point's exit status and stderr are checked once in a real process.
Every output goes under pytest's tmp_path, never into the repository's logs/.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import logging
import re
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from helpers import DISTILLENS, REPO, subprocess_env
from reference import Objective, objective_sums, weighted
from rouge_score import rouge_scorer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillens.cli import main
from distillens.console import error_line
from distillens.evaluation import GenerationSettings
from distillens.lightning_cli import run_cli
from distillens.models import STUDENT_ONLY, TeacherSpec
from distillens.module import DistillationModule
from distillens.objective import LayerPairs, LossConfig
from distillens.optimization import OptimizerConfig

TINY = REPO / "configs" / "tiny.yaml"
DATA = REPO / "data" / "instructions"
ERROR_PREFIX = "distillens: error: "
MAX_STEPS = 6  # configs/tiny.yaml


def tiny_args(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    """configs/tiny.yaml with absolute data paths and every output under run_dir.

    Validation every 3 steps across epochs (not only within one), so that the final step is validated and
    checkpointed too and last.ckpt holds the trained student. Test-time generation is cut to one seed and one
    batch: `distillens test --ckpt_path` takes the model's settings from the checkpoint, so they are set here.
    """
    return [
        "--config", str(TINY),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.check_val_every_n_epoch", "null",
        "--trainer.enable_progress_bar", "false",
        "--trainer.limit_test_batches", "1",
        "--model.generation.seeds", "[10]",
        "--data.train", str(DATA / "train.jsonl"),
        "--data.validation", str(DATA / "validation.jsonl"),
        "--data.test", str(DATA / "test.jsonl"),
        "--data.cache_dir", str(cache_dir),
        *overrides,
    ]  # fmt: skip


def run_distillens(args: list[str]):
    """run_cli as the console script runs it (LightningCLI warns when sys.argv holds pytest's arguments)."""
    with mock.patch.object(sys, "argv", ["distillens"]):
        return run_cli(args)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Tokenised splits shared by this module's runs (tokenising is quick, but not free)."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, cache_dir):
    """One `distillens fit` of the tiny config; the tests below inspect what it logged and wrote."""
    run_dir = tmp_path_factory.mktemp("fit")
    return run_distillens(["fit", *tiny_args(run_dir, cache_dir)]), run_dir / "tiny"


def sample_inputs(vocab_size: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))  # (B, T)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def logits_of(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits  # (B, T, V)


# ------------------------------------------------------------------------------------------------ fit


def assert_val_metrics_equal_the_reference(cli, objective: Objective, batches: int) -> None:
    """The logged val/* of the last validation (the final weights) equal the token means, over the first
    ``batches`` validation batches, of each term written out in tests/reference.py."""
    model, metrics = cli.model, cli.trainer.callback_metrics
    loader = cli.datamodule.val_dataloader()
    with torch.no_grad():
        sums = [objective_sums(model.student, model.teacher, b, objective) for b in islice(loader, batches)]
    tokens = sum(int(s["tokens"]) for s in sums)
    for name in ("ce", "kd", "lens"):
        expected = sum(float(s[name]) for s in sums) / tokens
        assert float(metrics[f"val/{name}"]) == pytest.approx(expected, rel=1e-4), f"val/{name}"
    expected = sum(float(weighted(s, objective)) for s in sums) / tokens
    assert float(metrics["val/loss"]) == pytest.approx(expected, rel=1e-4), "val/loss"


def test_fit_trains_to_max_steps_and_logs_the_objectives_validation_means(fitted):
    """configs/tiny.yaml: the paper's defaults (reverse KL + JSD lens, weights 1 and 1), pairs 1/2, 2 val batches.
    The training side of the objective is checked step by step in test_training_steps.py and test_resume.py."""
    cli, _ = fitted
    assert cli.trainer.global_step == MAX_STEPS
    assert_val_metrics_equal_the_reference(cli, Objective(student_layers=[1], teacher_layers=[2]), batches=2)
    for name in ("train/loss", "train/kd", "train/lens"):
        assert name in cli.trainer.callback_metrics, f"{name} not logged"


def test_fit_writes_the_run_folder(fitted):
    _, run = fitted
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard event file"
    tags = set()
    for path in run.glob("events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    assert {"lr-AdamW/decay", "lr-AdamW/no_decay", "val/loss"} <= tags and "hp_metric" not in tags, sorted(
        tags
    )
    for name in ("config.yaml", "hparams.yaml", "checkpoints/last.ckpt"):
        assert (run / name).is_file(), f"{run / name} missing"
    assert (run / "student" / "model.safetensors").is_file()
    assert (run / "student" / "tokenizer.json").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["max_steps"] == MAX_STEPS


def test_checkpoint_holds_the_student_and_no_teacher(fitted):
    cli, run = fitted
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert not [k for k in keys if "teacher" in k]
    student_keys = {f"student.{k}" for k in cli.model.student.state_dict()}
    assert student_keys <= keys
    assert checkpoint["global_step"] == MAX_STEPS
    final = cli.model.student.state_dict()
    for key, value in final.items():
        torch.testing.assert_close(checkpoint["state_dict"][f"student.{key}"], value, rtol=0, atol=0)


def test_end_of_fit_export_reloads_with_the_same_logits(fitted):
    cli, run = fitted
    exported = AutoModelForCausalLM.from_pretrained(run / "student")
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    assert tokenizer.eos_token == cli.model.tokenizer.eos_token
    inputs = sample_inputs(exported.config.vocab_size)
    torch.testing.assert_close(logits_of(exported, inputs), logits_of(cli.model.student, inputs))


def test_export_command_from_a_checkpoint_gives_the_checkpoints_logits(fitted, tmp_path, capsys):
    _, run = fitted
    checkpoint = run / "checkpoints" / "last.ckpt"
    main(["export", str(checkpoint), str(tmp_path / "exported")])
    assert "exported" in capsys.readouterr().out
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    restored = DistillationModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True)
    inputs = sample_inputs(exported.config.vocab_size)
    torch.testing.assert_close(logits_of(exported, inputs), logits_of(restored.student, inputs))


# ------------------------------------------------------------------------------------------------ validate, test


def val_loss_steps_tensorboard_serves(logs: Path) -> dict[str, list[int]]:
    """TensorBoard's view of every run under ``logs``: run name -> the steps of its val/loss curve."""
    runs = EventMultiplexer().AddRunsFromDirectory(str(logs)).Reload()
    return {  # the server reads scalars as tensors (its data provider)
        name: [event.step for event in runs.Tensors(name, "val/loss")]
        for name, tags in runs.Runs().items()
        if "val/loss" in tags["tensors"]
    }


def test_validate_and_test_keep_the_fits_curves_whole(fitted, cache_dir):
    """Each evaluation launch logs into a folder of its own in the run, so TensorBoard keeps every fit point."""
    _, run = fitted
    before = val_loss_steps_tensorboard_serves(run.parent)
    checkpoint = str(run / "checkpoints" / "last.ckpt")
    for _ in range(2):
        run_distillens(["validate", *tiny_args(run.parent, cache_dir), "--ckpt_path", checkpoint])
    after = val_loss_steps_tensorboard_serves(run.parent)
    assert before == {"tiny": [2, 5]}  # validations after steps 3 and 6, logged at the step they follow
    assert after == {**before, "tiny/validate-0": [0], "tiny/validate-1": [0]}
    assert (run / "validate-1" / "config.yaml").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == MAX_STEPS


def test_default_root_dir_holds_the_whole_run_and_a_new_run_keeps_off_it(tmp_path, cache_dir, capsys):
    """--trainer.default_root_dir D puts events, config, checkpoints and the export under D/<name>; a second fresh
    fit there stops with one line instead of replacing the first run's checkpoints."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    args = [
        "fit",
        *tiny_args(elsewhere, cache_dir, "--trainer.max_steps", "1"),
        "--trainer.default_root_dir",
        str(root),
    ]
    run_distillens(args)
    run = root / "tiny"
    for name in ("config.yaml", "hparams.yaml", "checkpoints/last.ckpt", "student/config.json"):
        assert (run / name).is_file(), f"{run / name} missing"
    assert list(run.glob("events.out.tfevents.*")) and not elsewhere.exists()
    capsys.readouterr()  # the first fit's output
    with pytest.raises(SystemExit), mock.patch.object(sys, "argv", ["distillens"]):
        main(args)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"distillens: error: {run} already holds a run (")
    assert (
        "continue it with --ckpt_path last, or start this one elsewhere with --trainer.default_root_dir"
        in line
    )


def test_validate_reproduces_the_validation_loss_of_fit(fitted, tmp_path, cache_dir):
    """The final checkpoint's validation loss, as fit recorded it in the checkpoint callback's state."""
    _, run = fitted
    checkpoint = run / "checkpoints" / "last.ckpt"
    recorded = torch.load(checkpoint, weights_only=True)["callbacks"]
    (score,) = [
        state["current_score"] for key, state in recorded.items() if key.startswith("ModelCheckpoint")
    ]
    metrics = run_distillens(
        ["validate", *tiny_args(tmp_path, cache_dir), "--ckpt_path", str(checkpoint)]
    ).trainer.callback_metrics
    torch.testing.assert_close(metrics["val/loss"], score.float(), rtol=1e-5, atol=0)


def test_test_scores_generations_on_each_test_set(fitted, tmp_path, cache_dir):
    _, run = fitted
    checkpoint = run / "checkpoints" / "last.ckpt"
    metrics = run_distillens(
        ["test", *tiny_args(tmp_path, cache_dir), "--ckpt_path", str(checkpoint)]
    ).trainer.callback_metrics
    scores = {k: float(v) for k, v in metrics.items() if k.endswith("/rougeL")}
    # a set is named after its file, or after its folder for generic names: data/instructions/test.jsonl
    assert list(scores) == ["test/instructions/rougeL"], f"logged: {sorted(metrics)}"
    # the answers written for the one seed, scored here with rouge_score itself (stemmed ROUGE-L F x100, best
    # reference), against the test set's own responses
    answers = [
        json.loads(line)
        for line in (tmp_path / "tiny" / "test-0" / "eval" / "instructions.seed10.jsonl").open()
    ]
    rows = [json.loads(line) for line in (DATA / "test.jsonl").open()]
    assert answers and len({answer["index"] for answer in answers}) == len(answers)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    per_answer = []
    for answer in answers:
        assert answer["references"] == [rows[answer["index"]]["response"]]
        assert rows[answer["index"]]["instruction"] in answer["prompt"]
        best = max(scorer.score(ref, answer["prediction"])["rougeL"].fmeasure for ref in answer["references"])
        per_answer.append(100 * best)
    assert scores["test/instructions/rougeL"] == pytest.approx(sum(per_answer) / len(per_answer), rel=1e-5)


# ------------------------------------------------------------------------------------------------ help


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """main(args) as the console script would run it: (exit status, stdout, stderr)."""
    try:
        with mock.patch.object(sys, "argv", ["distillens"]):
            main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


HELP_ENTRY = re.compile(r"^  (-[^\s,]+)")  # an option's first line in an argparse help page


def undocumented_options(help_text: str) -> list[str]:
    """Options whose help is empty or only jsonargparse's "(type: ..., default: ...)" note."""
    blocks: dict[str, str] = {}
    option = None
    for line in help_text.splitlines():
        if match := HELP_ENTRY.match(line):
            option = match.group(1)
            invocation_and_help = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            blocks[option] = invocation_and_help[1] if len(invocation_and_help) > 1 else ""
        elif option is not None and line.startswith("    "):
            blocks[option] += " " + line.strip()
        else:
            option = None
    assert blocks, "no options found in the help page"
    return sorted(name for name, text in blocks.items() if not text.split("(type:")[0].strip())


def test_fit_help_documents_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_in_process(["fit", "--help"], capsys)
    assert code == 0
    for option in ("--data.train", "--model.loss", "--trainer.max_steps", "--ckpt_path"):
        assert option in out
    # the module configures its own optimizer and schedule: LightningCLI's would silently replace them
    assert "--optimizer" not in out and "--lr_scheduler" not in out
    assert undocumented_options(out) == []


def attribute_docstrings(cls) -> dict[str, str]:
    """{field: the string literal under it} read from a dataclass's source (the --help text's origin)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {
        node.target.id: " ".join(after.value.value.split())
        for node, after in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value.value, str)
    }


@pytest.mark.parametrize(
    ("group", "cls"),
    [
        ("loss", LossConfig),
        ("layers", LayerPairs),
        ("optimizer", OptimizerConfig),
        ("generation", GenerationSettings),
        ("teacher", TeacherSpec),
    ],
)
def test_fit_help_documents_every_field_of_the_models_settings(group, cls, capsys, monkeypatch):
    """Every field of each settings dataclass has an option, with its attribute docstring as help."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_in_process(["fit", f"--model.{group}.help", cls.__name__], capsys)
    assert code == 0
    text = " ".join(out.split())
    docs = attribute_docstrings(cls)
    assert sorted(docs) == sorted(f.name for f in dataclasses.fields(cls)), "a field without a docstring"
    for name, doc in docs.items():
        assert f"--model.{group}.{name} " in text, f"--model.{group}.{name} missing"
        assert doc[:60] in text, f"--model.{group}.{name}: help does not show {doc[:60]!r}"


def test_the_teachers_help_offers_no_student_only_setting(capsys):
    code, out, _ = run_in_process(["fit", "--model.teacher.help", "TeacherSpec"], capsys)
    assert code == 0 and "--model.teacher.adapter" in out
    assert not [name for name in STUDENT_ONLY if name in out] and "Student only" not in out


def test_print_config_shows_overrides(capsys, tmp_path):
    args = ["fit", *tiny_args(tmp_path, tmp_path), "--model.loss.kd_divergence", "jsd", "--print_config"]
    code, out, _ = run_in_process(args, capsys)
    assert code == 0
    config = yaml.safe_load(out)
    assert config["model"]["loss"]["kd_divergence"] == "jsd"
    assert config["data"]["train"] == str(DATA / "train.jsonl")
    assert not (tmp_path / "tiny").exists(), "--print_config must not run anything"


def listed_subcommands(help_text: str) -> dict[str, str]:
    """{name: description} of the "Available subcommands" block of a top-level help page."""
    block = help_text.split("Available subcommands:", 1)[1]
    return dict(re.findall(r"^    ([a-z]+)\s+(\S.*)$", block, flags=re.MULTILINE))


def test_top_level_help_lists_the_subcommands(capsys):
    code, out, _ = run_in_process(["--help"], capsys)
    assert code == 0
    listed = listed_subcommands(out)
    assert sorted(listed) == ["diagnose", "export", "fit", "teach", "test", "validate"], listed


def test_predict_is_not_offered(capsys):
    """The module has no prediction step: `distillens test` answers, scores and saves; predict could only fail."""
    code, _, err = run_in_process(["predict", "--config", str(REPO / "configs" / "tiny.yaml")], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "predict" in lines[0], err


def test_top_level_help_lists_export_and_diagnose(capsys):
    _, out, _ = run_in_process(["--help"], capsys)
    assert {"export", "diagnose"} <= set(listed_subcommands(out))


@pytest.mark.parametrize("subcommand", ["export", "diagnose"])
def test_export_and_diagnose_have_their_own_help(subcommand, capsys):
    code, out, _ = run_in_process([subcommand, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: distillens {subcommand}")


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def malformed_yaml(tmp_path) -> Path:
    path = tmp_path / "broken.yaml"
    path.write_text("trainer:\n  max_steps: [1, 2\n  devices: 1\n")
    return path


BAD_INPUTS = {
    # case: (overrides, text the error line must contain)
    "unknown loss name": (["--model.loss.kd_divergence", "kl_typo"], "kl_typo"),
    "unknown option": (["--model.loss.kd_wieght", "1"], "kd_wieght"),
    "divergence parameter typo": (
        ["--model.loss.kd_params", "{{betta: 0.3}}"],  # braces doubled: the overrides go through str.format
        "model.loss.kd_params.betta: unknown parameter of reverse_kl (it takes none)",
    ),
    "divergence parameter out of range": (
        ["--model.loss.lens_params", "{{beta: 2}}"],
        "lens_params.beta=2.0",
    ),
    "negative loss weight": (["--model.loss.kd_weight", "-1"], "kd_weight=-1.0: loss weights must be >= 0"),
    "missing data file": (["--data.train", "{tmp}/missing.jsonl"], "missing.jsonl"),
    "vocabulary mismatch": (["--model.student.config.vocab_size", "1000"], "vocabularies differ"),
    "layer pair counts": (["--model.layers.student", "[1, 2]"], "2 student layers"),
    "layer out of range": (["--model.layers.student", "[5]"], "out of range"),
    "unknown model id": (
        ["--model.teacher.config", "null", "--model.teacher.source", "nobody/no-such-model"],
        "nobody/no-such-model",
    ),
    "data.max_length over a GPT-2 student's positions": (
        [
            "--model.student.config",
            "{{model_type: gpt2, vocab_size: 49152, n_embd: 32, n_layer: 2, n_head: 4, n_positions: 64}}",
        ],
        "data.max_length=128 is over the student's config.n_positions=64: use data.max_length <= 64",
    ),
    "on-policy answers past data.max_length": (
        ["--model.on_policy.teacher_fraction", "0.5", "--model.on_policy.max_new_tokens", "64"],
        "model.on_policy.max_new_tokens=64 plus prompts of up to data.max_prompt_length=96 tokens (160) is over "
        "data.max_length=128: use model.on_policy.max_new_tokens <= 32",
    ),
    "generated answers past the positions": (
        ["--model.generation.every_n_val", "1", "--model.generation.max_new_tokens", "600"],
        "model.generation.max_new_tokens=600 plus prompts of up to data.max_prompt_length=96 tokens (696) is over "
        "the student's config.max_position_embeddings=512: use model.generation.max_new_tokens <= 416",
    ),
    "malformed yaml": (["--config", "{yaml}"], "broken.yaml line 3"),
    "missing config file": (["--config", "{tmp}/absent.yaml"], "absent.yaml"),
}


def bad_args(case: str, tmp_path: Path, cache_dir: Path, yaml_path: Path) -> tuple[list[str], str]:
    overrides, expected = BAD_INPUTS[case]
    overrides = [o.format(tmp=tmp_path, yaml=yaml_path) for o in overrides]
    return ["fit", *tiny_args(tmp_path, cache_dir, *overrides)], expected


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line(case, tmp_path, cache_dir, malformed_yaml, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, expected = bad_args(case, tmp_path, cache_dir, malformed_yaml)
    code, out, err = run_in_process(args, capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), f"stderr was:\n{err}"
    assert expected in lines[0]
    assert "no checkpoint was saved yet" not in out  # a set-up error has nothing to say about checkpoints


CONFIG_FILES = {
    # case: (the file's bytes, text the error line must contain after the file's name)
    "not utf-8": (b"trainer:\n  max_steps: 3 # \xe9t\xe9\n", "not UTF-8 text"),
    "empty": (b"# nothing set yet\n", "empty"),
    "top-level list": (b"- trainer: {max_steps: 3}\n", "a list, not a mapping of settings"),
}


@pytest.mark.parametrize("case", CONFIG_FILES)
def test_a_config_file_that_is_not_a_mapping_is_one_line_naming_it(case, tmp_path, cache_dir, capsys):
    content, expected = CONFIG_FILES[case]
    path = tmp_path / "mine.yaml"
    path.write_bytes(content)
    code, _, err = run_in_process(["fit", *tiny_args(tmp_path, cache_dir, "--config", str(path))], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), err
    assert f"{path}: " in lines[0] and expected in lines[0], lines[0]


@pytest.mark.parametrize("case", ["vocabulary mismatch", "unknown model id"])
def test_a_model_error_after_tokenising_is_still_one_error_line(
    case, tmp_path, malformed_yaml, capsys, monkeypatch
):
    """These fail when the models are built, after the data module has tokenised (a cold cache): what the
    length filters did is progress on stdout, so stderr still holds the error line alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, expected = bad_args(case, tmp_path, tmp_path / "cold-cache", malformed_yaml)
    code, out, err = run_in_process(args, capsys)
    assert code == 1 and err.strip().splitlines() == [err.strip()] and expected in err, err
    assert "dropped 12 rows with prompts over max_prompt_length=96 tokens" in out  # it did tokenise


@pytest.mark.parametrize("case", ["vocabulary mismatch", "malformed yaml"])
def test_bad_input_raises_with_debug(case, tmp_path, cache_dir, malformed_yaml, monkeypatch):
    """--debug lets the exception out of main(), so Python prints its traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args, expected = bad_args(case, tmp_path, cache_dir, malformed_yaml)
    with pytest.raises(Exception, match=re.escape(expected)), mock.patch.object(sys, "argv", ["distillens"]):
        main([*args, "--debug"])


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("a\n  b\n", "a b"),
        (
            'Parser key "trainer.max_steps":\n  Expected an int. Got value: abc',
            "trainer.max_steps: Expected an int. Got value: abc",
        ),
        ("Parser key \"config\": File does not exist: 'x.yaml'", "config: File does not exist: 'x.yaml'"),
        (
            "Does not validate against any of the Union subtypes\nSubtypes: [A, NoneType]\nErrors:\n"
            "  - A: bad source\n  - Expected a <class 'NoneType'>\nGiven value type: dict\nGiven value: {}",
            "A: bad source",
        ),
    ],
)
def test_error_line_keeps_the_reason_of_a_multi_line_message(message, line):
    assert error_line(ValueError(message)) == line


def test_console_script_exits_with_status_1_and_one_stderr_line(tmp_path, cache_dir, malformed_yaml):
    """The installed entry point in a real process (the in-process tests above cannot see the exit status)."""
    args, expected = bad_args("malformed yaml", tmp_path, cache_dir, malformed_yaml)
    done = subprocess.run(
        [DISTILLENS, *args], cwd=REPO, capture_output=True, text=True, timeout=180, env=subprocess_env()
    )
    assert done.returncode == 1
    assert done.stderr.startswith(ERROR_PREFIX) and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr


def test_a_run_failing_after_the_trainer_is_built_prints_one_stderr_line(tmp_path, cache_dir):
    """In a real process, where Lightning is imported after the console's log routing and gives its logger a
    stderr handler of its own: its "INFO: ..." lines and the litlogger tip must not reach the console (the
    in-process test above imports Lightning first and could not see them)."""
    args = ["fit", *tiny_args(tmp_path, cache_dir, "--data.max_length", "1024")]
    done = subprocess.run(
        [DISTILLENS, *args], cwd=REPO, capture_output=True, text=True, timeout=180, env=subprocess_env()
    )
    assert done.returncode == 1
    assert done.stderr.startswith(ERROR_PREFIX) and done.stderr.count("\n") == 1, done.stderr
    assert "data.max_length=1024" in done.stderr
    assert "litlogger" not in done.stdout + done.stderr and "INFO:" not in done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ the default run


@pytest.mark.slow
def test_default_config_trains_end_to_end(tmp_path):
    """configs/default.yaml as shipped (SmolLM2-135M teacher, 12-block student), cut to two short steps; in fp32,
    so that the validation values can be compared with the fp32 reference (the shipped bf16-mixed runs the same
    objective with bf16 matrix products)."""
    args = [
        "fit", "--config", str(REPO / "configs" / "default.yaml"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.train", str(DATA / "train.jsonl"), "--data.validation", str(DATA / "validation.jsonl"),
        "--data.test", str(DATA / "test.jsonl"), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.max_samples", "16", "--data.batch_size", "2", "--data.max_length", "128",
        "--data.max_prompt_length", "96", "--trainer.precision", "32-true",
    ]  # fmt: skip
    cli = run_distillens(args)
    assert cli.trainer.global_step == 2
    # default.yaml: forward KL + JSD lens (weights 1 and 1) on 5 pairs, the exact lens term in validation: the
    # module's terms on a validation batch, with the trained weights, equal the objective written out in
    # tests/reference.py (the logged val/* against the reference:
    # test_fit_trains_to_max_steps_and_logs_the_objectives_validation_means)
    pairs = Objective(
        kd_divergence="forward_kl", student_layers=[2, 4, 6, 8, 10], teacher_layers=[2, 4, 6, 26, 28]
    )
    batch = next(iter(cli.datamodule.val_dataloader()))
    model = cli.model.eval()
    with torch.no_grad():
        terms, expected = model(batch), objective_sums(model.student, model.teacher, batch, pairs)
    for name in ("tokens", "ce", "kd", "lens"):
        assert float(terms[name]) == pytest.approx(float(expected[name]), rel=1e-4), name
    run = tmp_path / "default"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not [key for key in checkpoint["state_dict"] if "teacher" in key]
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    assert student.config.num_hidden_layers == 12  # model.student.init_from_teacher_layers


def test_fit_help_names_the_page_of_each_model_setting(capsys, monkeypatch):
    """The nested settings are not expanded in `fit --help`: it must say where their options are (the README too)."""
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = run_in_process(["fit", "--help"], capsys)
    readme = (REPO / "README.md").read_text()
    for group in ("teacher", "loss", "layers", "optimizer", "generation", "on_policy"):
        assert f"--model.{group}.help" in out and f"--model.{group}.help" in readme, group
    assert "--model.student.source" in out  # the student's own options are listed inline


def test_more_cpu_processes_than_cores_is_one_warning(caplog, monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.accelerators import CPUAccelerator

    from distillens.lightning_cli import warn_if_oversubscribed

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with caplog.at_level("WARNING", logger="distillens.lightning_cli"):
        warn_if_oversubscribed(SimpleNamespace(accelerator=CPUAccelerator(), num_devices=2))
        assert not caplog.records
        warn_if_oversubscribed(SimpleNamespace(accelerator=CPUAccelerator(), num_devices=3))
    assert len(caplog.records) == 1
    assert "trainer.devices=3 CPU processes on a machine with 2 core(s)" in caplog.records[0].getMessage()


@pytest.fixture
def cut_checkpoint(tmp_path) -> Path:
    """A checkpoint cut short at half its size, as a full disk or an interrupted copy leaves it."""
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"student.w": torch.zeros(64, 64)}, "student_config": {}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


@pytest.mark.parametrize("command", ["fit", "validate", "export", "diagnose"])
def test_a_cut_checkpoint_is_one_error_line_naming_the_file(
    command, cut_checkpoint, tmp_path, capsys, monkeypatch
):
    """Every command reading a checkpoint names the file (torch's own message names none)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {
        "fit": ["fit", *tiny_args(tmp_path, tmp_path / "cache"), "--ckpt_path", str(cut_checkpoint)],
        "validate": ["validate", *tiny_args(tmp_path, tmp_path / "cache"), "--ckpt_path", str(cut_checkpoint)],
        "export": ["export", str(cut_checkpoint), str(tmp_path / "out")],
        "diagnose": [
            "diagnose", "--teacher", str(cut_checkpoint.parent), "--student", str(cut_checkpoint),
            "--data", str(DATA / "validation.jsonl"), "--out", str(tmp_path / "out"),
        ],
    }[command]  # fmt: skip
    if command == "diagnose":  # the teacher is loaded first: make it cheap, the checkpoint is what fails
        monkeypatch.setattr("distillens.diagnose.load_model", lambda spec, teacher=None: None)
    code, _, err = run_in_process(args, capsys)
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith(ERROR_PREFIX), err
    assert f"{cut_checkpoint}: not a checkpoint torch can read" in err and "cut short" in err


def without_offline_mode(monkeypatch) -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def test_a_hub_model_without_network_is_one_line_in_seconds(tmp_path, cache_dir, capsys, monkeypatch):
    """No network and no offline mode: the probe fails at once (stubbed here: no test touches the network), and
    the line names the setting and both ways out, instead of the hub client's minute of retries."""
    without_offline_mode(monkeypatch)
    probes = []
    monkeypatch.setattr("distillens.hub.hub_reachable", lambda: probes.append(1) and False)
    overrides = ["--model.teacher.config", "null", "--model.teacher.source", "HuggingFaceTB/SmolLM2-1.7B"]
    started = time.perf_counter()
    code, _, err = run_in_process(["fit", *tiny_args(tmp_path, cache_dir, *overrides)], capsys)
    assert time.perf_counter() - started < 15 and probes
    assert code == 1 and err.strip().splitlines() == [err.strip()], err
    assert (
        "model.teacher.source: 'HuggingFaceTB/SmolLM2-1.7B' is not a local folder and the Hugging Face hub is "
        "unreachable" in err
    )
    assert "point model.teacher.source at the folder, or set HF_HUB_OFFLINE=1" in err


def test_the_readme_spells_command_options_as_their_help_pages_do():
    """`distillens export --help` lists --adapter_only: the README names it so (the dashed spelling still works)."""
    from distillens.commands import COMMANDS

    readme = (REPO / "README.md").read_text()
    for command in COMMANDS.values():
        for parameter in inspect.signature(command.function).parameters:
            assert f"--{parameter.replace('_', '-')}" not in readme or "_" not in parameter, parameter


def test_the_readme_says_which_changed_settings_a_resume_lists():
    """The resume line lists changed module hyper-parameters (resume.describe_changes): model.* settings, not
    the trainer's."""
    text = " ".join((REPO / "README.md").read_text().split())
    assert "one line lists each change;" not in text
    assert "one line lists each changed `model.*` setting (trainer settings are not listed)" in text


def test_no_library_tip_warning_or_progress_bar_reaches_the_console(tmp_path, capsys):
    """What every run printed and no user can act on: Lightning's litlogger tip (stdout), transformers'
    deprecation FutureWarning on every LoRA student, its "Loading weights" bar on stderr."""
    import warnings

    import lightning as L
    from transformers import LlamaConfig

    from distillens.console import route_logging
    from distillens.lora import LoraSpec, add_lora
    from distillens.models import ModelSpec, load_model

    fields = dict(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(LlamaConfig(**fields)).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # what the first run of a process shows (later ones hide repeats)
        route_logging()
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
        add_lora(load_model(ModelSpec(source=str(tmp_path / "model"))), LoraSpec(r=2))
    out, err = capsys.readouterr()
    assert "litlogger" not in out, out
    assert err == "", err
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_a_library_loggers_record_is_printed_once(capsys):
    """huggingface_hub gives its logger a stderr handler and lets records propagate to the root, where the
    CLI's routing handlers are: each record must still reach the console once."""
    from huggingface_hub.utils import logging as hub_logging

    from distillens.console import route_logging

    library = logging.getLogger("huggingface_hub")
    own = logging.StreamHandler(sys.stderr)  # as the library adds at import (sys.stderr is capsys's now)
    saved = library.handlers[:], library.propagate
    library.handlers[:] = [own]
    library.propagate = True
    try:
        route_logging()
        hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("distillens.tests").warning("a record of ours")
    finally:
        library.handlers[:], library.propagate = saved
    err = capsys.readouterr().err
    assert err.count("Retrying in 1s [Retry 1/5].") == 1, err
    assert err.count("a record of ours") == 1, err


def test_exports_prompt_as_training_did_and_replace_a_folder_only_when_asked(fitted, tmp_path, capsys):
    """configs/tiny.yaml trains on Alpaca prompts: the end-of-fit export and `distillens export` of its checkpoint
    give a chat pipeline those prompts (not SmolLM2's ChatML); a second export into the same folder needs
    --overwrite, which `distillens export --help` documents."""
    from distillens.data.formats import Example
    from distillens.data.templates import make_prompt_renderer

    cli, run = fitted
    assert cli.datamodule.template == "alpaca"
    instruction = "Name three primary colours."
    trained = make_prompt_renderer("alpaca", cli.model.tokenizer)(Example(instruction, "", "", ("",)))
    checkpoint, out = run / "checkpoints" / "last.ckpt", tmp_path / "exported"
    assert run_in_process(["export", str(checkpoint), str(out)], capsys)[0] == 0
    for folder in (run / "student", out):
        tokenizer = AutoTokenizer.from_pretrained(folder)
        messages = [{"role": "user", "content": instruction}]
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == trained
        assert tokenizer.model_max_length == 512  # configs/tiny.yaml's max_position_embeddings
    code, _, err = run_in_process(["export", str(checkpoint), str(out)], capsys)
    assert code == 1 and f"export folder {out} is not empty" in err and "--overwrite" in err
    assert run_in_process(["export", str(checkpoint), str(out), "--overwrite"], capsys)[0] == 0
    assert "--overwrite" in run_in_process(["export", "--help"], capsys)[1]


def test_the_entry_points_command_names_are_the_commands():
    from distillens.cli import COMMAND_NAMES
    from distillens.commands import COMMANDS

    assert set(COMMAND_NAMES) == set(COMMANDS)


def run_entry_point(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that imports this tree: what loads before the entry point answers."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=subprocess_env(), cwd=cwd, timeout=300,
    )  # fmt: skip


def test_a_missing_config_file_is_reported_before_any_library_loads(tmp_path):
    result = run_entry_point(
        """
        import sys
        from distillens.cli import main
        try:
            main(["fit", "--config", "absent.yaml"])
        except SystemExit as stop:
            print(stop.code, [m for m in ("torch", "lightning", "transformers", "peft") if m in sys.modules])
        """,
        tmp_path,
    )
    assert result.stdout.strip() == "1 []", result.stderr
    assert result.stderr.strip() == (
        "distillens: error: --config absent.yaml: no such file (run with --debug for the traceback)"
    )


def test_ctrl_c_while_lightning_imports_is_one_line(tmp_path):
    """The Ctrl-C handler is in place before the heavy imports: a SIGINT raised from inside Lightning's import."""
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    result = run_entry_point(
        f"""
        import os, signal, sys, time

        class CtrlCWhenLightningLoads:
            def find_spec(self, name, path=None, target=None):
                if name == "lightning":
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)  # the handler raises first
                return None

        sys.meta_path.insert(0, CtrlCWhenLightningLoads())
        from distillens.cli import main
        main(["fit", "--config", {str(config)!r}])
        """,
        tmp_path,
    )
    assert (result.returncode, result.stderr.strip()) == (130, "distillens: interrupted (Ctrl-C)")


def test_export_and_diagnose_load_without_lightnings_cli(tmp_path):
    result = run_entry_point(
        """
        import sys
        from distillens.cli import main
        try:
            main(["export", "--help"])
        except SystemExit:
            print("lightning.pytorch.cli" in sys.modules, "distillens.diagnose" in sys.modules, file=sys.stderr)
        """,
        tmp_path,
    )
    assert "usage: distillens export" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "False False"
