"""The replication study's machinery (scripts/replicate.py) on tiny random models: every output file with the right
rows, the table's statistics against values computed here, resumption, and the presets it ships. No result of the
study itself is asserted: tiny random models score nothing meaningful."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO

from distillens.lightning_cli import run_cli

PRESETS = REPO / "configs" / "replicate"


def load_replicate():
    spec = importlib.util.spec_from_file_location("replicate", REPO / "scripts" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["replicate"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


replicate = load_replicate()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """`replicate.py tiny` run once, in this process (the CLI steps too), into a temporary folder."""
    out = tmp_path_factory.mktemp("replicate")
    with mock.patch.object(sys, "argv", ["replicate"]):
        replicate.main(["tiny", "--out", str(out), "--in-process"])
    return replicate.Preset.load("tiny"), out


def test_every_run_trained_exported_and_scored(study):
    preset, out = study
    for method in preset.methods:
        for seed in preset.train_seeds:
            folder = out / "runs" / method / f"seed{seed}"
            assert (folder / "student" / "config.json").is_file(), folder
            assert list(folder.glob("events.out.tfevents.*")), folder
            results = json.loads((folder / "eval" / "results.json").read_text())
            assert results["seeds"] == preset.generation_seeds
            greedy = json.loads((folder / "eval-greedy" / "results.json").read_text())
            assert greedy["generation"]["do_sample"] is False and greedy["seeds"] == [0]
            assert (folder / "fit.finished").is_file()
    assert (out / "teacher" / "eval" / "results.json").is_file()
    assert (out / "teacher" / "eval-greedy" / "results.json").is_file()


def test_the_study_runs_the_teacher_once_per_teacher_and_every_method_reads_its_cache(study):
    """The tiny preset caches hidden states (teacher_targets: hidden): its random teacher differs by seed, so one
    cache per seed, built by the first method that reads the teacher and read by the others; SFT has no teacher
    term and runs as it is."""
    preset, out = study
    caches = sorted((out / "teacher-cache").glob("hidden-*"))
    assert len(caches) == len(preset.train_seeds) and all((c / "manifest.json").is_file() for c in caches)
    for seed in preset.train_seeds:
        runs = {m: out / "runs" / m / f"seed{seed}" for m in preset.methods}
        kinds = {
            m: (yaml.safe_load((r / "config.yaml").read_text())["model"]["teacher_targets"] or {}).get(
                "kind", "live"
            )
            for m, r in runs.items()
        }
        assert kinds == {"sft": "live", "kd": "hidden", "rkl": "hidden", "distillens": "hidden"}
        built = [m for m, r in runs.items() if "teacher cache (hidden)" in (r / "fit.log").read_text()]
        assert built == ["kd"], (
            f"seed {seed}: the cache was built by {built}"
        )  # the first in the preset's order


def test_runs_differ_by_method_and_seed(study):
    """Each method trained with its own objective and each seed with its own initialisation and data order: the
    saved configs say so, and two seeds of one method end with different weights."""
    preset, out = study
    weights = {}
    for method in preset.methods:
        for seed in preset.train_seeds:
            config = yaml.safe_load((out / "runs" / method / f"seed{seed}" / "config.yaml").read_text())
            overlay = yaml.safe_load((PRESETS / "methods" / f"{method}.yaml").read_text())["model"]["loss"]
            assert {k: config["model"]["loss"][k] for k in overlay} == overlay
            assert config["seed_everything"] == seed and config["data"]["seed"] == seed
            from safetensors.torch import load_file

            weights[method, seed] = load_file(
                out / "runs" / method / f"seed{seed}" / "student" / "model.safetensors"
            )
    first, second = preset.train_seeds[:2]
    name = next(iter(weights["distillens", first]))
    assert not torch.equal(weights["distillens", first][name], weights["distillens", second][name])


def test_results_json_aggregates_the_runs_own_scores(study):
    """Per method: each seed's score is the mean over generation seeds of what that run's test wrote per seed; the
    row is their mean and sample std; the paired differences are computed seed by seed."""
    preset, out = study
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["methods"]) == ["teacher", *preset.methods]
    per_method = {}
    for method in preset.methods:
        per_seed = {}
        for seed in preset.train_seeds:
            written = json.loads(
                (out / "runs" / method / f"seed{seed}" / "eval" / "results.json").read_text()
            )
            by_generation_seed = written["sets"]["instructions"]["per_seed"]
            assert sorted(map(int, by_generation_seed)) == preset.generation_seeds
            per_seed[seed] = {
                m: statistics.fmean(scores[m] for scores in by_generation_seed.values())
                for m in preset.metrics
            }
        per_method[method] = per_seed
        row = summary["methods"][method]
        for metric in preset.metrics:
            values = [per_seed[s][metric] for s in preset.train_seeds]
            assert row[metric]["mean"] == pytest.approx(sum(values) / len(values))
            assert row[metric]["std"] == pytest.approx(statistics.stdev(values))
    for baseline in ("kd", "rkl", "sft"):
        diff = summary["differences"][f"distillens-{baseline}"]["rougeL"]
        expected = [
            per_method["distillens"][s]["rougeL"] - per_method[baseline][s]["rougeL"]
            for s in preset.train_seeds
        ]
        assert list(diff["per_seed"].values()) == pytest.approx(expected)
        assert diff["positive"] == sum(d > 0 for d in expected) and diff["seeds"] == len(expected)


def test_results_markdown_has_a_table_per_decoding_with_a_row_per_method_and_per_difference(study):
    preset, out = study
    table = (out / "results.md").read_text()
    rows = [
        line.split("|")[1].strip()
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    one = ["method", "teacher", *preset.methods, "paired difference [95% interval] (seeds > 0)"] + [
        f"distillens-{m}" for m in preset.methods if m != "distillens"
    ]
    assert rows == one * 2  # sampled, then greedy; one test set
    assert "### sampled decoding, test set `instructions`" in table
    assert "### greedy decoding, test set `instructions`" in table
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert "| rougeL | rougeL other's | rougeL gap |" in header and "| openings |" in header
    assert "Generation (sampled): do_sample True, top_k 0" in table
    assert "Generation (greedy): do_sample False" in table


def test_intervals_pair_the_runs_prompt_by_prompt_and_seed_by_seed(study):
    """Each difference's interval is the bootstrap of (DistillLens minus baseline) per training seed and prompt,
    built here from every run's own per-prompt scores (mean over its generation seeds)."""
    from distillens.intervals import paired_bootstrap

    preset, out = study
    summary = json.loads((out / "results.json").read_text())

    def per_prompt(method, seed, decoding, measure):
        folder = "eval" if decoding == "sampled" else "eval-greedy"
        written = json.loads((out / "runs" / method / f"seed{seed}" / folder / "results.json").read_text())
        by_seed = written["sets"]["instructions"]["per_example"].values()
        if measure.endswith("_gap"):
            name = measure.removesuffix("_gap")
            return np.mean([np.array(s[name]) - np.array(s[f"{name}_other"]) for s in by_seed], axis=0)
        return np.mean([s[measure] for s in by_seed], axis=0)

    for decoding in preset.decodings:
        found = summary["tables"][decoding]["instructions"]["differences"]["distillens-rkl"]
        for measure in ("rougeL", "rougeL_gap"):
            differences = np.stack([
                per_prompt("distillens", s, decoding, measure) - per_prompt("rkl", s, decoding, measure)
                for s in preset.train_seeds
            ])  # fmt: skip
            assert found[measure] == pytest.approx(paired_bootstrap([differences]).as_dict())
            assert found[measure]["mean"] == pytest.approx(differences.mean())
        rows = summary["tables"][decoding]["instructions"]["methods"]
        assert set(rows) == {"teacher", *preset.methods} and "eos" in rows["rkl"]


def test_excerpts_show_every_method_answering_the_same_prompts(study):
    preset, out = study
    text = (out / "excerpts.md").read_text()
    assert text.count("#### Prompt") == 3
    for method in ["teacher", *preset.methods]:
        assert text.count(f"- **{method}**:") == 3


def test_an_interrupted_fit_is_not_counted_as_finished(tmp_path):
    """A fit stopped by Ctrl-C may leave student/ behind; without the marker of a normal end it is run again
    (resuming from its last.ckpt), and its old scores are not used."""
    preset = replicate.Preset.load("tiny")
    preset.methods, preset.train_seeds, preset.score_teacher = ["distillens"], [1], False
    run = replicate.Run("distillens", 1, tmp_path / "runs" / "distillens" / "seed1")
    (run.student).mkdir(parents=True)
    (run.student / "config.json").write_text("{}")
    calls = []
    with mock.patch.object(
        replicate, "execute", side_effect=lambda command, *rest, **kw: calls.append(command[3])
    ):
        replicate.run_all(preset, tmp_path)
    assert calls == ["fit", "test", "test"] and run.finished.is_file()
    calls.clear()
    with mock.patch.object(
        replicate, "execute", side_effect=lambda command, *rest, **kw: calls.append(command[3])
    ):
        replicate.run_all(preset, tmp_path)
    assert calls == ["test", "test"]  # finished now; the scores were never written by the mock


def colour_pixels(image, colour: str) -> int:
    """How many pixels of an RGB(A) image (H, W, 3|4) of floats are within 2% of a matplotlib colour."""
    from matplotlib.colors import to_rgb

    return int((abs(image[..., :3] - to_rgb(colour)) < 0.02).all(axis=-1).sum())


def test_figures_draw_every_method(tmp_path, monkeypatch):
    """rougeL.png: one bar per method in C0 (the teacher's in grey) with heights from the summary; val_curves.png:
    one line colour per trained method; both in the sizes the script sets (inches x 120 dpi). Drawn from a summary
    and curves made up here (the tiny study's scores are 0 and its curves one point long)."""
    from matplotlib.image import imread

    methods = {"teacher": 30.0, "sft": 10.0, "distillens": 20.0}
    summary = {
        "preset": "made-up",
        "metrics": ["rougeL"],
        "methods": {
            name: {
                "rougeL": {"mean": mean, "std": 1.0},
                "seeds": [1, 2],
                "per_seed": {1: {"rougeL": mean - 1}},
            }
            for name, mean in methods.items()
        },
    }
    runs = [replicate.Run("teacher", None, tmp_path)]
    runs += [replicate.Run(name, seed, tmp_path / name) for name in ("sft", "distillens") for seed in (1, 2)]
    losses = {
        "sft": [9.0, 7.0, 6.0, 5.5],
        "distillens": [9.0, 5.0, 4.0, 3.0],
    }  # apart: neither line hides the other
    monkeypatch.setattr(
        replicate, "scalar_curve", lambda folder, curve: ([0, 10, 20, 30], losses[folder.name])
    )
    bars_path, curves_path = replicate.figures(summary, runs, tmp_path, "val/loss")
    bars, curves = imread(bars_path), imread(curves_path)
    assert (bars.shape[:2], curves.shape[:2]) == ((420, 720), (480, 840))
    assert colour_pixels(bars, "C0") > 5000 and colour_pixels(bars, "0.6") > 5000
    assert colour_pixels(curves, "C1") > 200 and colour_pixels(curves, "C2") > 200  # sft, distillens
    assert colour_pixels(curves, "C0") == 0  # C0 is the teacher's slot, and the teacher has no curve


def test_rerun_skips_finished_runs(study, capsys):
    _, out = study
    with mock.patch.object(replicate, "execute", side_effect=AssertionError("a finished step was run again")):
        replicate.main(["tiny", "--out", str(out), "--in-process"])
    assert "paired difference" in capsys.readouterr().out


def test_interrupted_fit_resumes_from_its_last_checkpoint(tmp_path):
    preset = replicate.Preset.load("tiny")
    run = replicate.Run("distillens", 1, tmp_path / "runs" / "distillens" / "seed1")
    assert "--ckpt_path" not in replicate.fit_command(preset, run)
    (run.folder / "checkpoints").mkdir(parents=True)
    (run.folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    command = replicate.fit_command(preset, run)
    assert command[command.index("--ckpt_path") + 1] == str(run.folder / "checkpoints" / "last.ckpt")


def test_paired_differences_by_hand():
    scores = {
        "distillens": {1: {"rougeL": 10.0}, 2: {"rougeL": 12.0}, 3: {"rougeL": 9.0}},
        "kd": {1: {"rougeL": 8.0}, 2: {"rougeL": 12.5}, 3: {"rougeL": 7.0}, 4: {"rougeL": 1.0}},
    }
    diff = replicate.paired_differences(scores, "kd", "rougeL")
    assert diff["per_seed"] == {"1": 2.0, "2": -0.5, "3": 2.0}  # seed 4 has no DistillLens run: not paired
    assert diff["mean"] == pytest.approx(3.5 / 3)
    assert diff["std"] == pytest.approx(((2 - 3.5 / 3) ** 2 * 2 + (-0.5 - 3.5 / 3) ** 2) ** 0.5 / 2**0.5)
    assert (diff["positive"], diff["seeds"]) == (2, 3)
    assert replicate.paired_differences(scores, "rkl", "rougeL") is None


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_and_its_runs_parse(path, capsys):
    """Each shipped preset names existing methods, and each method's fit parses on the preset's base config."""
    preset = replicate.Preset.load(path.stem)
    assert preset.methods and preset.train_seeds and preset.generation_seeds  # recipes: one seed a candidate
    run = replicate.Run(
        preset.methods[-1], preset.train_seeds[0], Path("/tmp/unused") / "runs" / "m" / "seed1"
    )
    args = replicate.fit_command(preset, run)[4:]  # after "python -m distillens fit"
    with mock.patch.object(sys, "argv", ["distillens"]), pytest.raises(SystemExit) as stop:
        run_cli(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed_everything"] == preset.train_seeds[0]


def test_unknown_preset_is_one_line():
    with pytest.raises(SystemExit, match=r"replicate: no preset 'nope' .*presets: .*tiny"):
        replicate.Preset.load("nope")


def test_methods_option_runs_a_subset_and_refuses_unknown_names():
    preset = replicate.Preset.load("tiny")
    assert replicate.only(preset, "rkl, distillens").methods == ["rkl", "distillens"]
    assert replicate.only(preset, None) == preset
    with pytest.raises(SystemExit, match=r"--methods \['nope'\] not in preset 'tiny'"):
        replicate.only(preset, "rkl,nope")


def test_decodings_option_scores_under_some_decodings_only():
    preset = replicate.Preset.load("tiny")
    preset.decodings = ["sampled", "greedy"]
    chosen = replicate.only(preset, None, "greedy")
    assert chosen.decodings == ["greedy"] and chosen.methods == preset.methods
    with pytest.raises(SystemExit, match=r"--decodings \['beam'\] not in preset 'tiny'"):
        replicate.only(preset, None, "beam")


def test_no_teacher_option_leaves_the_teacher_unscored_now():
    preset = replicate.Preset.load("tiny")
    assert replicate.only(preset, None, None, teacher=False).score_teacher is False
    assert replicate.only(preset, None, None).score_teacher is preset.score_teacher


def test_comparisons_are_the_proposed_method_against_each_other_then_the_extra_pairs():
    preset = replicate.Preset.load("tiny")
    preset.also_compare = [["rkl", "sft"], ["distillens", "kd"]]  # the second is already among the first
    assert preset.comparisons() == [
        ("distillens", "sft"),
        ("distillens", "kd"),
        ("distillens", "rkl"),
        ("rkl", "sft"),
    ]


def test_which_methods_of_a_study_read_the_teacher_cache():
    """cpu-evidence caches hidden states for the methods that read the teacher from the references; on-policy
    runs are told to keep the live teacher (the default they start from caches), SFT runs need no telling (a
    module whose objective reads nothing of the teacher runs live); the top-k method keeps its own kind; all caches
    in the study's folder."""
    preset = replicate.Preset.load("cpu-evidence")
    out = Path("/tmp/unused")
    args = {
        m: replicate.targets_args(preset, replicate.Run(m, 1, out / "runs" / m / "seed1"))
        for m in preset.methods
    }
    cache = ["--model.teacher_targets.cache_dir", str(out / "teacher-cache")]
    hidden, live = (
        ["--model.teacher_targets.kind", "hidden", *cache],
        ["--model.teacher_targets.kind", "live"],
    )
    assert args == {
        "distillens_fkl": hidden, "fkl": hidden, "distillens": hidden, "rkl": hidden, "kd": hidden, "sft": [],
        "distillens_fkl_onpolicy": live, "distillens_fkl_topk64": cache,
    }  # fmt: skip
