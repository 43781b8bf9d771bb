"""`make replicate PRESET=cpu`: the paper's comparison (SFT, KD, RKL, DistillLens) at a scale we can run.

For each method of the preset and each training seed, one `distillens fit` (the preset's base config plus the
method's overlay from configs/replicate/methods/), then one `distillens test` of the exported student under every
generation seed; the teacher is scored the same way once. The table compares methods by the mean over training
seeds of each run's mean over generation seeds, with the spread over training seeds, and pairs DistillLens with
each baseline seed by seed (same seed = same data order and initialisation), counting how many seeds agree in sign.

Every step runs the real CLI in its own process and writes into
``logs/replicate/<preset>/runs/<method>/seed<k>/`` (the fit's run folder: events, checkpoints, student/, eval/).
Rerunning the same preset skips finished steps: a fit whose student/ was exported, a test whose results.json exists;
an interrupted fit resumes from its last.ckpt. Outputs: results.json, results.md, rougeL.png, val_curves.png.

    python scripts/replicate.py cpu          # the bundled-data preset for 2 CPU cores (configs/replicate/cpu.yaml)
    python scripts/replicate.py tiny --out /tmp/r   # seconds: tiny random models, for the tests
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "replicate"
METHODS = PRESETS / "methods"
PROPOSED = "distillens"  # the row every baseline is compared with, seed by seed
TEACHER = "teacher"


@dataclass
class Preset:
    """One experiment: which base config, which methods, how many seeds, how to score (configs/replicate/*.yaml)."""

    name: str
    config: list[str]
    methods: list[str]
    train_seeds: list[int]
    generation_seeds: list[int]
    metrics: list[str] = field(default_factory=lambda: ["rougeL", "exact_match"])
    fit_args: list[str] = field(default_factory=list)
    test_args: list[str] = field(default_factory=list)
    score_teacher: bool = True
    curve: str = "val/ce"

    @classmethod
    def load(cls, name: str) -> Preset:
        path = PRESETS / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in PRESETS.glob("*.yaml"))
            raise SystemExit(f"replicate: no preset {name!r} ({path}); presets: {', '.join(known)}")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        unknown = set(values) - set(cls.__dataclass_fields__) - {"description"}
        if unknown:
            raise SystemExit(f"replicate: {path}: unknown field(s) {sorted(unknown)}")
        values.pop("description", None)
        preset = cls(name=name, **values)
        missing = [m for m in preset.methods if not (METHODS / f"{m}.yaml").is_file()]
        if missing:
            raise SystemExit(f"replicate: {path}: no method overlay for {missing} in {METHODS}")
        return preset


@dataclass(frozen=True)
class Run:
    """One trained student (method x training seed), or the teacher (method "teacher", seed None)."""

    method: str
    seed: int | None
    folder: Path

    @property
    def label(self) -> str:
        return self.method if self.seed is None else f"{self.method}/seed{self.seed}"

    @property
    def results(self) -> Path:
        return self.folder / "eval" / "results.json"

    @property
    def student(self) -> Path:
        return self.folder / "student"


def plan(preset: Preset, out: Path) -> list[Run]:
    """Every student run, seed-major so that an interrupted preset has complete seeds of every method first."""
    return [
        Run(method, seed, out / "runs" / method / f"seed{seed}")
        for seed, method in itertools.product(preset.train_seeds, preset.methods)
    ]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distillens", *args]


def call(command: list[str], stream) -> int:
    return subprocess.call(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT)


def call_in_process(args: list[str], stream) -> int:
    from distillens.cli import main

    with contextlib.chdir(ROOT), contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        try:
            main(args)
        except SystemExit as exit_:
            return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def configs(preset: Preset) -> list[str]:
    return [arg for path in preset.config for arg in ("--config", str(ROOT / path))]


def fit_command(preset: Preset, run: Run) -> list[str]:
    """`distillens fit` of one method and seed; the run folder is the logger's <save_dir>/<name>/<version>."""
    command = cli(
        "fit", *configs(preset), "--config", str(METHODS / f"{run.method}.yaml"),
        "--seed_everything", str(run.seed), "--data.seed", str(run.seed),
        "--trainer.logger.init_args.save_dir", str(run.folder.parents[1]),
        "--trainer.logger.init_args.name", run.method,
        "--trainer.logger.init_args.version", run.folder.name,
        *preset.fit_args,
    )  # fmt: skip
    if (run.folder / "checkpoints" / "last.ckpt").is_file():
        command += ["--ckpt_path", str(run.folder / "checkpoints" / "last.ckpt")]
    return command


def generation_args(preset: Preset, run: Run) -> list[str]:
    return [
        "--model.generation.seeds", json.dumps(preset.generation_seeds),
        "--model.generation.metrics", json.dumps(preset.metrics),
        "--model.generation.output_dir", str(run.results.parent),
        "--trainer.logger", "false", "--trainer.default_root_dir", str(run.results.parent),
        *preset.test_args,
    ]  # fmt: skip


def test_command(preset: Preset, run: Run) -> list[str]:
    """`distillens test` of the exported student alone (no teacher, the student's own folder and tokenizer)."""
    return cli(
        "test", *configs(preset),
        "--model.teacher", "null", "--model.student.init_from_teacher_layers", "null",
        "--model.student.config", "null", "--model.student.tokenizer", "null",
        "--model.student.source", str(run.student),
        "--model.loss.ce_weight", "1", "--model.loss.kd_weight", "0", "--model.loss.lens_weight", "0",
        "--model.loss.mse_weight", "0", *generation_args(preset, run),
    )  # fmt: skip


def teacher_command(preset: Preset, run: Run) -> list[str]:
    return cli(
        "test", *configs(preset), "--model.generation.generator", "teacher", *generation_args(preset, run)
    )


def execute(command: list[str], log: Path, label: str, in_process: bool = False) -> None:
    """Run one CLI step with its output in a log file; stop the whole preset with the log's tail on failure.

    Each step is its own process (a clean slate per run); ``in_process`` calls the CLI's ``main`` here instead,
    which saves the interpreter start-up on tiny presets (the tests).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"[replicate] {label}: {' '.join(command[3:5])} ... (log: {log})", flush=True)
    with log.open("a", encoding="utf-8") as stream:
        code = call_in_process(command[3:], stream) if in_process else call(command, stream)
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-5:])
        raise SystemExit(f"replicate: {label} failed (exit {code}); last lines of {log}:\n{tail}")
    print(f"[replicate] {label}: done in {time.monotonic() - started:.0f} s", flush=True)


def run_all(preset: Preset, out: Path, in_process: bool = False) -> list[Run]:
    """Train and score every run not finished yet; returns every run, the teacher's first when scored."""
    runs = plan(preset, out)
    teacher = Run(TEACHER, None, out / TEACHER)
    if preset.score_teacher and not teacher.results.is_file():
        execute(teacher_command(preset, teacher), teacher.folder / "test.log", teacher.label, in_process)
    for run in runs:
        if not (run.student / "config.json").is_file():
            execute(fit_command(preset, run), run.folder / "fit.log", f"fit {run.label}", in_process)
        if not run.results.is_file():
            execute(test_command(preset, run), run.folder / "test.log", f"test {run.label}", in_process)
    return ([teacher] if preset.score_teacher else []) + runs


# ---------------------------------------------------------------------------------------------------------------
# The table


def run_scores(run: Run) -> dict[str, float]:
    """A run's scores: the mean over generation seeds of each metric, averaged over its test sets."""
    results = json.loads(run.results.read_text(encoding="utf-8"))
    return dict(results["average"]["mean"])


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_differences(
    scores: dict[str, dict[int, dict[str, float]]], baseline: str, metric: str
) -> dict[str, Any] | None:
    """DistillLens minus a baseline, seed by seed over the seeds both have: mean, std, and sign agreement."""
    if PROPOSED not in scores or baseline not in scores:
        return None
    seeds = sorted(set(scores[PROPOSED]) & set(scores[baseline]))
    if not seeds:
        return None
    diffs = [scores[PROPOSED][s][metric] - scores[baseline][s][metric] for s in seeds]
    return {
        "per_seed": dict(zip(map(str, seeds), diffs, strict=True)),
        **mean_std(diffs),
        "positive": sum(d > 0 for d in diffs),
        "seeds": len(diffs),
    }


def summarise(preset: Preset, runs: list[Run]) -> dict[str, Any]:
    """results.json: per method, the scores of every training seed and their mean/std; paired differences."""
    by_method: dict[str, dict[int, dict[str, float]]] = {}
    rows: dict[str, Any] = {}
    for run in runs:
        if run.method == TEACHER:
            rows[TEACHER] = {
                "seeds": [],
                "per_seed": {},
                **{m: mean_std([s]) for m, s in run_scores(run).items()},
            }
            continue
        by_method.setdefault(run.method, {})[run.seed] = run_scores(run)
    for method, per_seed in by_method.items():
        rows[method] = {
            "seeds": sorted(per_seed),
            "per_seed": {str(seed): scores for seed, scores in sorted(per_seed.items())},
            **{m: mean_std([scores[m] for scores in per_seed.values()]) for m in preset.metrics},
        }
    baselines = [m for m in preset.methods if m != PROPOSED]
    differences = {
        f"{PROPOSED}-{base}": {m: paired_differences(by_method, base, m) for m in preset.metrics}
        for base in baselines
    }
    return {
        "preset": preset.name,
        "config": preset.config,
        "fit_args": preset.fit_args,
        "train_seeds": sorted({run.seed for run in runs if run.seed is not None}),  # the finished ones
        "generation_seeds": preset.generation_seeds,
        "metrics": preset.metrics,
        "methods": rows,
        "differences": differences,
        "protocol": protocol_of(runs),
    }


def protocol_of(runs: list[Run]) -> str:
    """The generation protocol line the scoring runs recorded (the same for all: they share the settings)."""
    for run in runs:
        results = json.loads(run.results.read_text(encoding="utf-8"))
        generation = results.get("generation", {})
        keys = ("do_sample", "top_k", "top_p", "temperature", "max_new_tokens", "no_repeat_ngram_size")
        return ", ".join(f"{k} {generation[k]}" for k in keys if k in generation)
    return ""


def markdown(summary: dict[str, Any]) -> str:
    """results.md: mean ± std over training seeds (each seed: mean over generation seeds), then the differences."""
    metrics = summary["metrics"]
    lines = [
        f"| method | training seeds | {' | '.join(metrics)} |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for method, row in summary["methods"].items():
        cells = " | ".join(f"{row[m]['mean']:.2f} ± {row[m]['std']:.2f}" for m in metrics)
        lines.append(f"| {method} | {len(row['seeds']) or '-'} | {cells} |")
    lines += ["", f"| paired difference (same training seed) | {' | '.join(metrics)} |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for name, by_metric in summary["differences"].items():
        cells = [
            f"{d['mean']:+.2f} ± {d['std']:.2f} ({d['positive']}/{d['seeds']} seeds > 0)" if d else "-"
            for d in (by_metric[m] for m in metrics)
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        f"Preset `{summary['preset']}` ({', '.join(summary['config'])} {' '.join(summary['fit_args'])}); "
        f"training seeds {summary['train_seeds']}; each run scored under generation seeds "
        f"{summary['generation_seeds']} (mean over them), then mean ± sample std over training seeds; scores x100.",
        f"Generation: {summary['protocol']}.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Figures


def scalar_curve(run_folder: Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar over every event file of a run folder, in step order, last write wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for events in sorted(run_folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def figures(summary: dict[str, Any], runs: list[Run], out: Path, curve: str) -> list[Path]:
    """rougeL.png (each method's score with its spread over training seeds) and val_curves.png (every run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metrics"][0]
    names = list(summary["methods"])
    means = [summary["methods"][n][metric]["mean"] for n in names]
    stds = [summary["methods"][n][metric]["std"] for n in names]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar(names, means, yerr=stds, capsize=4, color=["0.6" if n == TEACHER else "C0" for n in names])
    for index, name in enumerate(names):
        seeds = summary["methods"][name]["per_seed"].values()
        axis.plot([index] * len(seeds), [s[metric] for s in seeds], "k.", zorder=3)
    axis.set_ylabel(f"{metric} (x100)")
    axis.set_title(f"{summary['preset']}: mean ± std over training seeds (dots: seeds)")
    figure.tight_layout()
    bars = out / f"{metric}.png"
    figure.savefig(bars, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    colours = {m: f"C{i}" for i, m in enumerate(summary["methods"]) if m != TEACHER}
    for run in runs:
        if run.method == TEACHER:
            continue
        steps, values = scalar_curve(run.folder, curve)
        first = run.seed == summary["methods"][run.method]["seeds"][0]
        axis.plot(steps, values, "-o", ms=3, color=colours[run.method], label=run.method if first else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel(curve)
    axis.legend()
    axis.set_title(f"{summary['preset']}: {curve} of every run")
    figure.tight_layout()
    curves = out / "val_curves.png"
    figure.savefig(curves, dpi=120)
    plt.close(figure)
    return [bars, curves]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="replicate", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a preset of configs/replicate/ (cpu, gpu, tiny)")
    parser.add_argument("--out", type=Path, help="output folder; default logs/replicate/<preset>")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from finished runs only")
    parser.add_argument("--in-process", action="store_true", help="run the CLI steps in this process (tests)")
    options = parser.parse_args(argv)
    preset = Preset.load(options.preset)
    out = (options.out or ROOT / "logs" / "replicate" / preset.name).resolve()
    runs = plan(preset, out) if options.table_only else run_all(preset, out, options.in_process)
    if options.table_only:
        teacher = Run(TEACHER, None, out / TEACHER)
        runs = ([teacher] if teacher.results.is_file() else []) + [r for r in runs if r.results.is_file()]
    summary = summarise(preset, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown(summary)
    (out / "results.md").write_text(table, encoding="utf-8")
    written = figures(summary, runs, out, preset.curve)
    print(f"\n{table}\nwritten: {out / 'results.json'}, {out / 'results.md'}, {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
