"""Lens diagnostics against a by-hand computation from transformers' hidden states, the PNG and JSON files, the
`distillens diagnose` command, and the validation callback's TensorBoard scalars and figure."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO
from matplotlib.image import imread
from transformers import LlamaConfig, LlamaForCausalLM

from distillens.cli import main
from distillens.diagnose import labelled_batches
from distillens.diagnostics import (
    LensReport,
    lens_diagnostics,
    proportional_depths,
    save_lens_diagnostics,
)
from distillens.lens import LogitLens
from distillens.lightning_cli import run_cli

VOCAB = 61
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_llama(layers: int, hidden: int, seed: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def batches() -> list[dict[str, torch.Tensor]]:
    """Two right-padded batches whose rows supervise different spans (prompt tokens and padding are -100)."""
    generator = torch.Generator().manual_seed(3)
    out = []
    for starts, lengths in (([2, 4], [9, 7]), ([1], [6])):
        width = max(lengths)
        input_ids = torch.randint(0, VOCAB, (len(lengths), width), generator=generator)  # (B, T)
        positions = torch.arange(width)  # (T,)
        attention_mask = (positions < torch.tensor(lengths)[:, None]).long()  # (B, T)
        supervised = (positions >= torch.tensor(starts)[:, None]) & attention_mask.bool()  # (B, T)
        labels = input_ids.masked_fill(~supervised, -100)  # (B, T)
        out.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return out


def lens_logits_by_hand(model: LlamaForCausalLM, batch: dict, depth: int) -> torch.Tensor:
    """Logit lens from `output_hidden_states`: norm + unembedding below the top; the model's own logits at the top
    (transformers' last hidden state already has the final norm)."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    if depth == model.config.num_hidden_layers:
        return out.logits  # (B, T, V)
    return model.lm_head(model.model.norm(out.hidden_states[depth]))  # (B, T, V)


def expected_report(student, teacher, teacher_layers, data=None) -> dict[str, list[float]]:
    """Per-depth means over supervised positions of ``data`` (default: batches()) with formulas written out here."""
    totals = {name: np.zeros(len(teacher_layers)) for name in ("jsd", "s_ent", "t_ent", "s_top", "t_top")}
    tokens = 0
    with torch.no_grad():
        for batch in data if data is not None else batches():
            keep = batch["labels"][:, 1:] != -100  # (B, T-1)
            tokens += int(keep.sum())
            answer = lens_logits_by_hand(teacher, batch, teacher.config.num_hidden_layers)[:, :-1][
                keep
            ].argmax(-1)
            for k, j in enumerate(teacher_layers):
                p = torch.softmax(lens_logits_by_hand(student, batch, k)[:, :-1][keep].double(), -1)  # (N, V)
                q = torch.softmax(lens_logits_by_hand(teacher, batch, j)[:, :-1][keep].double(), -1)  # (N, V)
                m = (p + q) / 2
                kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
                totals["jsd"][k] += float((kl(p, m) / 2 + kl(q, m) / 2).sum())
                totals["s_ent"][k] += float(-(p * p.log()).sum())
                totals["t_ent"][k] += float(-(q * q.log()).sum())
                totals["s_top"][k] += float((p.argmax(-1) == answer).sum())
                totals["t_top"][k] += float((q.argmax(-1) == answer).sum())
    return {name: (values / tokens).tolist() for name, values in totals.items()} | {"tokens": tokens}


def test_proportional_depths_pair_embeddings_and_last_blocks():
    assert proportional_depths(2, 4) == [0, 2, 4]
    assert proportional_depths(6, 30) == [0, 5, 10, 15, 20, 25, 30]
    assert proportional_depths(3, 2) == [0, 1, 1, 2]  # round half to even: 2/3 -> 1, 4/3 -> 1
    with pytest.raises(ValueError, match="depths must be >= 1"):
        proportional_depths(0, 4)


@pytest.mark.parametrize("chunk_size", [3, 256])
def test_diagnostics_match_a_by_hand_computation(chunk_size):
    student, teacher = tiny_llama(2, 16, seed=1), tiny_llama(4, 32, seed=2)
    report = lens_diagnostics(LogitLens(student), LogitLens(teacher), batches(), chunk_size=chunk_size)
    expected = expected_report(student, teacher, [0, 2, 4])
    assert report.student_layers == [0, 1, 2] and report.teacher_layers == [0, 2, 4]
    assert (
        report.tokens == expected["tokens"] == (9 - 2) + (7 - 4) + (6 - 1)
    )  # length - first supervised position
    np.testing.assert_allclose(report.divergence, expected["jsd"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(report.student_entropy, expected["s_ent"], rtol=1e-4)
    np.testing.assert_allclose(report.teacher_entropy, expected["t_ent"], rtol=1e-4)
    assert report.student_top1 == pytest.approx(expected["s_top"])
    assert report.teacher_top1 == pytest.approx(expected["t_top"])


def test_a_model_against_itself_has_zero_divergence_and_full_agreement_at_the_top():
    model = tiny_llama(3, 16, seed=4)
    model.train()
    report = lens_diagnostics(LogitLens(model), LogitLens(model), batches())
    assert report.divergence == pytest.approx([0.0] * 4, abs=1e-6)
    assert report.student_entropy == pytest.approx(report.teacher_entropy)
    assert report.student_top1[-1] == 1.0
    assert model.training  # the caller's mode is given back


def test_diagnostics_reject_batches_without_supervised_tokens():
    model = tiny_llama(2, 16, seed=5)
    batch = batches()[0]
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no supervised token"):
        lens_diagnostics(LogitLens(model), LogitLens(model), [batch])


def sample_report() -> LensReport:
    return LensReport(
        divergence_name="jsd",
        student_layers=[0, 1, 2],
        teacher_layers=[0, 2, 4],
        divergence=[0.0, 0.3, 0.5],
        student_entropy=[1.0, 2.0, 3.0],
        teacher_entropy=[1.0, 1.5, 1.2],
        student_top1=[0.0, 0.1, 0.4],
        teacher_top1=[0.0, 0.5, 1.0],
        tokens=12,
    )


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)  # (H, W, 4) floats in [0, 1]
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.01  # something is drawn


def test_save_writes_a_valid_png_and_the_report_as_json(tmp_path):
    report = sample_report()
    png, report_json = save_lens_diagnostics(report, tmp_path / "out")
    assert_valid_png(png)
    assert LensReport(**json.loads(report_json.read_text())) == report


def test_scalars_name_each_quantity_and_layer_pair():
    scalars = sample_report().scalars()
    assert len(scalars) == 5 * 3
    assert scalars["lens_diag/divergence/s1_t2"] == 0.3
    assert scalars["lens_diag/teacher_top1/s2_t4"] == 1.0


# ----------------------------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, smollm2_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diagnose-models")
    folders = {}
    for role, (layers, hidden, seed) in {"teacher": (4, 32, 1), "student": (2, 16, 2)}.items():
        folders[role] = root / role
        tiny_llama(layers, hidden, seed, vocab=len(smollm2_tokenizer)).save_pretrained(folders[role])
        smollm2_tokenizer.save_pretrained(folders[role])
    return folders


def diagnose_args(folders, student: str, out: Path, cache: Path) -> list[str]:
    data = REPO / "data" / "instructions" / "validation.jsonl"
    return ["diagnose", "--teacher", str(folders["teacher"]), "--student", student, "--data", str(data),
            "--out", str(out), "--max-samples", "4", "--max-length", "128", "--max-prompt-length", "96",
            "--cache-dir", str(cache)]  # fmt: skip


@pytest.mark.parametrize("student", ["folder", "layers:0,3"])
def test_diagnose_command_writes_png_and_json(model_folders, tmp_path, student, smollm2_tokenizer):
    spec = str(model_folders["student"]) if student == "folder" else student
    main(diagnose_args(model_folders, spec, tmp_path / "out", tmp_path / "cache"))
    assert_valid_png(tmp_path / "out" / "lens_diagnostics.png")
    report = json.loads((tmp_path / "out" / "lens_diagnostics.json").read_text())
    assert report["student_layers"] == [0, 1, 2] and report["teacher_layers"] == [0, 2, 4]
    if student.startswith(
        "layers:"
    ):  # a copy of teacher blocks 0 and 3: embeddings identical to the teacher's
        assert report["tokens"] > 0
        assert report["divergence"][0] == pytest.approx(0.0, abs=1e-6)
        return
    # the folder student: every value against the by-hand computation on the same 4 validation examples
    data = labelled_batches(
        str(REPO / "data" / "instructions" / "validation.jsonl"), smollm2_tokenizer, max_samples=4,
        max_length=128, max_prompt_length=96, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    models = [LlamaForCausalLM.from_pretrained(model_folders[role]).eval() for role in ("student", "teacher")]
    expected = expected_report(*models, [0, 2, 4], list(data))
    assert report["tokens"] == expected["tokens"]
    for key, name in (("divergence", "jsd"), ("student_entropy", "s_ent"), ("teacher_entropy", "t_ent")):
        np.testing.assert_allclose(report[key], expected[name], rtol=1e-4, atol=1e-6, err_msg=key)
    assert report["student_top1"] == pytest.approx(expected["s_top"])
    assert report["teacher_top1"] == pytest.approx(expected["t_top"])


def test_diagnose_command_reports_a_bad_student_spec_in_one_line(model_folders, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(diagnose_args(model_folders, "layers:0,x", tmp_path / "out", tmp_path / "cache"))
    assert stop.value.code == 1
    assert "student spec 'layers:0,x'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- callback


def fit_with_lens_diagnostics(tmp_path: Path, student: dict, teacher: dict, steps: int):
    """configs/tiny.yaml with these models for ``steps`` steps and one validation at the end, with LensDiagnostics
    on one batch; returns the CLI and the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["model"].update(teacher=teacher, student=student, layers={"count": 1})
    config["trainer"].update(max_steps=steps, val_check_interval=steps, limit_val_batches=1)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    config["trainer"]["callbacks"] = [
        {"class_path": "distillens.callbacks.LensDiagnostics", "init_args": {"max_batches": 1}}
    ]
    for split in ("train", "validation", "test"):
        config["data"][split] = str(REPO / config["data"][split])
    # the test models have 64 positions: sequences must fit them (checked when the models are built)
    config["data"].update(
        cache_dir=str(tmp_path / "cache"), max_samples=8, max_length=64, max_prompt_length=48
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_cli(["fit", "--config", str(path), "--trainer.enable_checkpointing", "false"])
    size_guidance = {"images": 0, "scalars": 0}
    return cli, EventAccumulator(str(tmp_path / "logs" / "tiny"), size_guidance=size_guidance).Reload()


def test_callback_logs_scalars_and_a_figure_to_tensorboard(model_folders, tmp_path):
    cli, events = fit_with_lens_diagnostics(
        tmp_path,
        {"source": str(model_folders["student"])},
        {"source": str(model_folders["teacher"])},
        steps=2,
    )
    assert "lens_diag/figure" in events.Tags()["images"]
    scalars = events.Tags()["scalars"]
    for quantity in ("divergence", "student_entropy", "teacher_entropy", "student_top1", "teacher_top1"):
        assert {f"lens_diag/{quantity}/s{i}_t{j}" for i, j in ((0, 0), (1, 2), (2, 4))} <= set(scalars)
    # the values of the last validation (the final weights, its first batch), computed by hand
    model = cli.model
    expected = expected_report(
        model.student, model.teacher, [0, 2, 4], list(islice(cli.datamodule.val_dataloader(), 1))
    )
    for quantity, name in (("divergence", "jsd"), ("student_entropy", "s_ent"), ("teacher_entropy", "t_ent"),
                           ("student_top1", "s_top"), ("teacher_top1", "t_top")):  # fmt: skip
        for k, (i, j) in enumerate(((0, 0), (1, 2), (2, 4))):
            logged = events.Scalars(f"lens_diag/{quantity}/s{i}_t{j}")[-1].value
            assert logged == pytest.approx(expected[name][k], rel=1e-4, abs=1e-6), f"{quantity} s{i}_t{j}"


def test_the_callback_compares_a_layer_subset_student_with_the_blocks_it_was_copied_from(
    model_folders, tmp_path
):
    """Student = teacher blocks 2 and 3: its depths 0, 1, 2 against teacher depths 0, 3, 4 (not 0, 2, 4)."""
    teacher = {"source": str(model_folders["teacher"])}
    _, events = fit_with_lens_diagnostics(tmp_path, {"init_from_teacher_layers": [2, 3]}, teacher, steps=1)
    compared = {
        tag.rsplit("/", 1)[1] for tag in events.Tags()["scalars"] if tag.startswith("lens_diag/divergence/")
    }
    assert compared == {"s0_t0", "s1_t3", "s2_t4"}


@pytest.fixture
def layer_subset_checkpoint(model_folders, tmp_path) -> Path:
    """A fit checkpoint as `distillens fit` writes it for a student copied from teacher blocks 2 and 3, trained
    with one automatic pair (count 1) on chat-template prompts."""
    from dataclasses import asdict

    from distillens.models import ModelSpec, student_from_teacher_layers
    from distillens.objective import LayerPairs

    teacher = LlamaForCausalLM.from_pretrained(model_folders["teacher"])
    student = student_from_teacher_layers(teacher, [2, 3])
    path = tmp_path / "run.ckpt"
    torch.save(
        {
            "state_dict": {f"student.{key}": value for key, value in student.state_dict().items()},
            "student_config": student.config.to_dict(),
            "hyper_parameters": {
                "student": asdict(ModelSpec(init_from_teacher_layers=[2, 3])),
                "teacher": asdict(ModelSpec(source=str(model_folders["teacher"]))),
                "layers": asdict(LayerPairs(count=1)),
            },
            "datamodule_hyper_parameters": {"template": "chat"},
        },
        path,
    )
    return path


@pytest.mark.parametrize(
    ("options", "student_layers", "teacher_layers"),
    [
        ([], [1], [3]),  # the run's pair: student hidden state 1 = its block 0, a copy of teacher block 2
        (["--every_depth", "true"], [0, 1, 2], [0, 2, 4]),
        (["--student_layers", "[2]", "--teacher_layers", "[4]"], [2], [4]),
    ],
)
def test_diagnose_on_a_checkpoint_defaults_to_the_pairs_and_template_it_trained_with(
    options, student_layers, teacher_layers, model_folders, layer_subset_checkpoint, tmp_path, monkeypatch
):
    import distillens.diagnose as diagnose

    templates = []
    batches = diagnose.labelled_batches
    monkeypatch.setattr(
        diagnose,
        "labelled_batches",
        lambda *a, **kw: templates.append(kw["template"]) or batches(*a, **kw),
    )
    args = diagnose_args(model_folders, str(layer_subset_checkpoint), tmp_path / "out", tmp_path / "cache")
    main([*args, *options])
    report = json.loads((tmp_path / "out" / "lens_diagnostics.json").read_text())
    assert (report["student_layers"], report["teacher_layers"]) == (student_layers, teacher_layers)
    assert templates == ["chat"]
