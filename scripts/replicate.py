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
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from distillens.intervals import paired_bootstrap
from distillens.measures import DIAGNOSTICS

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "replicate"
PROPOSED = "distillens"  # the row every baseline is compared with, seed by seed
TEACHER = "teacher"
AVERAGE = "average"  # the mean over a run's test sets, beside each set
DECODINGS = {"sampled": "eval", "greedy": "eval-greedy"}
"""How a run's answers are generated -> the folder of its scores: the preset's sampling seeds, and greedy."""


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
    decodings: list[str] = field(default_factory=lambda: ["sampled", "greedy"])
    """How every run is scored: "sampled" (the paper's protocol, under each generation seed, in eval/) and "greedy"
    (one pass, in eval-greedy/)."""
    overlays: str = "configs/replicate/methods"
    """Folder of the method overlays, relative to the repository."""
    proposed: str = PROPOSED
    """The method every other one is compared with, seed by seed and prompt by prompt."""
    also_compare: list[list[str]] = field(default_factory=list)
    """More [method, baseline] pairs to compare, beside the proposed method against each other one."""
    teacher_targets: str = "live"
    """model.teacher_targets.kind of every fit whose objective reads the teacher from its training batches: hidden
    (or topk) builds the teacher cache in the first such fit and every later method and seed reads it; on-policy
    methods and SFT run as they are (new sequences; no teacher term), and a method whose overlay chooses its own
    kind keeps it (its cache in the study's folder too)."""

    def comparisons(self) -> list[tuple[str, str]]:
        """(method, baseline) pairs of the difference tables: the proposed one against every other, then the rest."""
        pairs = [(self.proposed, base) for base in self.methods if base != self.proposed]
        return pairs + [(method, base) for method, base in self.also_compare if (method, base) not in pairs]

    @property
    def overlay_folder(self) -> Path:
        return ROOT / self.overlays

    def overlay(self, method: str) -> Path:
        return self.overlay_folder / f"{method}.yaml"

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
        if not preset.decodings or set(preset.decodings) - set(DECODINGS):
            raise SystemExit(
                f"replicate: {path}: decodings {preset.decodings}: use some of {list(DECODINGS)}"
            )
        missing = [m for m in preset.methods if not preset.overlay(m).is_file()]
        strangers = {m for pair in preset.also_compare for m in pair} - set(preset.methods)
        if strangers or any(len(pair) != 2 for pair in preset.also_compare):
            raise SystemExit(f"replicate: {path}: also_compare needs [method, baseline] pairs of its methods")
        if missing:
            raise SystemExit(f"replicate: {path}: no method overlay for {missing} in {preset.overlay_folder}")
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

    def results_of(self, decoding: str) -> Path:
        return self.folder / DECODINGS[decoding] / "results.json"

    @property
    def student(self) -> Path:
        return self.folder / "student"

    @property
    def finished(self) -> Path:
        """Written when the fit process ended normally, i.e. training reached its planned end; an interrupted fit
        (Ctrl-C exits 130) or a crashed one leaves no marker, whatever else its folder holds."""
        return self.folder / "fit.finished"


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
        "fit", *configs(preset), "--config", str(preset.overlay(run.method)),
        "--seed_everything", str(run.seed), "--data.seed", str(run.seed),
        "--trainer.logger.init_args.save_dir", str(run.folder.parents[1]),
        "--trainer.logger.init_args.name", run.method,
        "--trainer.logger.init_args.version", run.folder.name,
        *targets_args(preset, run), *preset.fit_args,
    )  # fmt: skip
    if (run.folder / "checkpoints" / "last.ckpt").is_file():
        command += ["--ckpt_path", str(run.folder / "checkpoints" / "last.ckpt")]
    return command


def targets_args(preset: Preset, run: Run) -> list[str]:
    """The preset's teacher targets for a method that can read them (its objective reads the teacher and it trains
    on the references only: the base configs' and the overlay's model.loss and model.on_policy, merged), cached in
    the study's folder (``teacher-cache/``, beside ``runs/``)."""
    from distillens.objective import LossConfig
    from distillens.onpolicy import OnPolicyConfig

    model: dict[str, dict] = {"loss": {}, "on_policy": {}, "teacher_targets": {}}
    for path in [*(ROOT / p for p in preset.config), preset.overlay(run.method)]:
        settings = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("model") or {}
        for group in model:
            model[group].update(settings.get(group) or {})
    own_kind = (settings.get("teacher_targets") or {}).get("kind")  # the overlay's (the last file read)
    loss, on_policy = LossConfig(**model["loss"]), OnPolicyConfig(**model["on_policy"])
    if on_policy.enabled:  # new sequences: a config that caches is told to run the teacher live
        return ["--model.teacher_targets.kind", "live"]
    if not loss.reads_teacher or preset.teacher_targets == "live":
        return []  # nothing to cache (the module then runs live whatever the kind), or the preset runs live
    cache = ["--model.teacher_targets.cache_dir", str(run.folder.parents[2] / "teacher-cache")]
    if own_kind not in (None, "live"):
        return cache  # the method's own kind (e.g. top-k targets beside the exact ones)
    return ["--model.teacher_targets.kind", preset.teacher_targets, *cache]


def generation_args(preset: Preset, run: Run, decoding: str = "sampled") -> list[str]:
    """Scoring settings of one decoding: the preset's sampling seeds, or one greedy pass."""
    folder = run.results_of(decoding).parent
    greedy = ["--model.generation.do_sample", "false"] if decoding == "greedy" else []
    seeds = [0] if decoding == "greedy" else preset.generation_seeds
    return [
        "--model.generation.seeds", json.dumps(seeds),
        "--model.generation.metrics", json.dumps(preset.metrics),
        "--model.generation.output_dir", str(folder),
        "--trainer.logger", "false", "--trainer.default_root_dir", str(folder),
        *preset.test_args, *greedy,
    ]  # fmt: skip


def decodings(preset: Preset) -> list[str]:
    return preset.decodings


def test_command(preset: Preset, run: Run, decoding: str = "sampled") -> list[str]:
    """`distillens test` of the exported student alone (no teacher, the student's own folder and tokenizer)."""
    return cli(
        "test", *configs(preset),
        "--model.teacher", "null", "--model.student.init_from_teacher_layers", "null",
        "--model.student.config", "null", "--model.student.tokenizer", "null",
        "--model.student.source", str(run.student),
        "--model.loss.ce_weight", "1", "--model.loss.kd_weight", "0", "--model.loss.lens_weight", "0",
        "--model.loss.mse_weight", "0", *generation_args(preset, run, decoding),
    )  # fmt: skip


def teacher_command(preset: Preset, run: Run, decoding: str = "sampled") -> list[str]:
    return cli(
        "test", *configs(preset), "--model.generation.generator", "teacher",
        *generation_args(preset, run, decoding),
    )  # fmt: skip


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
    for decoding in decodings(preset) if preset.score_teacher else []:
        if not teacher.results_of(decoding).is_file():
            command = teacher_command(preset, teacher, decoding)
            execute(command, teacher.folder / "test.log", f"{teacher.label} ({decoding})", in_process)
    for run in runs:
        if not run.finished.is_file():
            execute(fit_command(preset, run), run.folder / "fit.log", f"fit {run.label}", in_process)
            run.finished.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {commit()}\n", encoding="utf-8")
        for decoding in decodings(preset):
            if not run.results_of(decoding).is_file():
                command = test_command(preset, run, decoding)
                execute(command, run.folder / "test.log", f"test {run.label} ({decoding})", in_process)
    return ([teacher] if preset.score_teacher else []) + runs


def commit() -> str:
    """The commit the study runs on (recorded with each finished fit), with "+changes" for a dirty tree."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True
    )
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------------------------
# The table


def run_scores(run: Run, decoding: str = "sampled", test_set: str = AVERAGE) -> dict[str, float]:
    """A run's scores on one test set (or averaged over its sets): the mean over generation seeds of each
    measure (metrics, their scores against other prompts' references, prompt gaps, diagnostics)."""
    results = json.loads(run.results_of(decoding).read_text(encoding="utf-8"))
    summary = results["average"] if test_set == AVERAGE else results["sets"][test_set]
    return dict(summary["mean"])


def test_sets(run: Run, decoding: str) -> list[str]:
    """The test sets a run was scored on, then the average over them when there are several."""
    names = list(json.loads(run.results_of(decoding).read_text(encoding="utf-8"))["sets"])
    return names + ([AVERAGE] if len(names) > 1 else [])


def prompt_scores(run: Run, decoding: str, test_set: str, measure: str) -> np.ndarray:
    """(prompts,) one measure per prompt of a set, the mean over the run's generation seeds; ``<metric>_gap`` is
    the prompt's score minus its score against another prompt's references."""
    sets = json.loads(run.results_of(decoding).read_text(encoding="utf-8"))["sets"]
    by_seed = sets[test_set]["per_example"].values()
    if measure.endswith("_gap"):
        metric = measure.removesuffix("_gap")
        return np.mean([np.subtract(s[metric], s[f"{metric}_other"]) for s in by_seed], axis=0)
    return np.mean([s[measure] for s in by_seed], axis=0)


def interval(
    by_seed: dict[str, dict[int, Run]],
    proposed: str,
    baseline: str,
    decoding: str,
    sets: list[str],
    measure: str,
) -> dict[str, Any] | None:
    """Proposed minus baseline on ``sets`` (their average when several), paired by training seed and prompt,
    with its 95% bootstrap interval over prompts and seeds (`distillens.intervals`)."""
    if proposed not in by_seed or baseline not in by_seed:
        return None
    seeds = sorted(set(by_seed[proposed]) & set(by_seed[baseline]))
    if not seeds:
        return None
    differences = [
        np.stack([
            prompt_scores(by_seed[proposed][seed], decoding, name, measure)
            - prompt_scores(by_seed[baseline][seed], decoding, name, measure)
            for seed in seeds
        ])  # (seeds, prompts)
        for name in sets
    ]  # fmt: skip
    return paired_bootstrap(differences).as_dict()


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_differences(
    scores: dict[str, dict[int, dict[str, float]]], baseline: str, metric: str, proposed: str = PROPOSED
) -> dict[str, Any] | None:
    """The proposed method minus a baseline, seed by seed over the seeds both have: mean, std, sign agreement."""
    if proposed not in scores or baseline not in scores:
        return None
    seeds = sorted(set(scores[proposed]) & set(scores[baseline]))
    if not seeds:
        return None
    diffs = [scores[proposed][s][metric] - scores[baseline][s][metric] for s in seeds]
    return {
        "per_seed": dict(zip(map(str, seeds), diffs, strict=True)),
        **mean_std(diffs),
        "positive": sum(d > 0 for d in diffs),
        "seeds": len(diffs),
    }


def measures_of(preset: Preset) -> list[str]:
    """The columns of a study table: each metric, against another prompt's references, the gap; diagnostics."""
    scores = [key for metric in preset.metrics for key in (metric, f"{metric}_other", f"{metric}_gap")]
    return scores + list(DIAGNOSTICS)


def table(preset: Preset, runs: list[Run], decoding: str, test_set: str) -> dict[str, Any]:
    """One decoding on one test set: per method, each measure's mean and std over training seeds; the proposed
    method minus each other one with paired bootstrap intervals, for every metric and its prompt gap."""
    scored = [run for run in runs if run.results_of(decoding).is_file()]
    rows: dict[str, Any] = {}
    by_seed: dict[str, dict[int, Run]] = {}
    for run in scored:
        by_seed.setdefault(run.method, {})[run.seed] = run
    for method, seeds in by_seed.items():
        per_seed = {seed: run_scores(run, decoding, test_set) for seed, run in sorted(seeds.items())}
        columns = [m for m in measures_of(preset) if all(m in scores for scores in per_seed.values())]
        rows[method] = {
            "seeds": [seed for seed in per_seed if seed is not None],
            "per_seed": {str(seed): scores for seed, scores in per_seed.items()},
            **{m: mean_std([scores[m] for scores in per_seed.values()]) for m in columns},
        }
    sets = (
        [name for name in test_sets(scored[0], decoding) if name != AVERAGE]
        if test_set == AVERAGE
        else [test_set]
    )
    compared = [key for metric in preset.metrics for key in (metric, f"{metric}_gap")]
    differences = {
        f"{method}-{base}": {m: interval(by_seed, method, base, decoding, sets, m) for m in compared}
        for method, base in preset.comparisons()
    }
    return {"methods": rows, "differences": differences}


def summarise(preset: Preset, runs: list[Run]) -> dict[str, Any]:
    """results.json: on the preset's first decoding, averaged over test sets, per method the scores of every
    training seed, their mean/std and the seed-by-seed differences ("methods", "differences", as the figure
    shows them); then every decoding and test set in full ("tables": measures, prompt gaps, diagnostics, paired
    intervals)."""
    primary = preset.decodings[0]
    by_method: dict[str, dict[int, dict[str, float]]] = {}
    rows: dict[str, Any] = {}
    for run in runs:
        if run.method == TEACHER:
            scores = run_scores(run, primary)
            rows[TEACHER] = {
                "seeds": [],
                "per_seed": {},
                **{m: mean_std([scores[m]]) for m in preset.metrics},
            }
            continue
        by_method.setdefault(run.method, {})[run.seed] = run_scores(run, primary)
    for method, per_seed in by_method.items():
        rows[method] = {
            "seeds": sorted(per_seed),
            "per_seed": {str(seed): scores for seed, scores in sorted(per_seed.items())},
            **{m: mean_std([scores[m] for scores in per_seed.values()]) for m in preset.metrics},
        }
    differences = {
        f"{method}-{base}": {m: paired_differences(by_method, base, m, method) for m in preset.metrics}
        for method, base in preset.comparisons()
    }
    scored = {d: [run for run in runs if run.results_of(d).is_file()] for d in decodings(preset)}
    return {
        "preset": preset.name,
        "config": preset.config,
        "fit_args": preset.fit_args,
        "train_seeds": sorted({run.seed for run in runs if run.seed is not None}),  # the finished ones
        "generation_seeds": preset.generation_seeds,
        "metrics": preset.metrics,
        "decoding": primary,
        "methods": rows,
        "differences": differences,
        "protocol": protocol_of(runs, primary),
        "tables": {
            decoding: {name: table(preset, found, decoding, name) for name in test_sets(found[0], decoding)}
            for decoding, found in scored.items()
            if found
        },
        "protocols": {decoding: protocol_of(runs, decoding) for decoding in decodings(preset)},
    }


def protocol_of(runs: list[Run], decoding: str = "sampled") -> str:
    """The generation protocol line the scoring runs recorded (the same for all: they share the settings)."""
    for run in runs:
        if not run.results_of(decoding).is_file():
            continue
        results = json.loads(run.results_of(decoding).read_text(encoding="utf-8"))
        generation = results.get("generation", {})
        keys = ("do_sample", "top_k", "top_p", "temperature", "max_new_tokens", "no_repeat_ngram_size")
        return ", ".join(f"{k} {generation[k]}" for k in keys if k in generation)
    return ""


def markdown(summary: dict[str, Any]) -> str:
    """results.md: per decoding and test set, each method's measures (mean ± std over training seeds, each seed the
    mean over generation seeds) and the proposed method minus each other one with paired 95% intervals."""
    lines = []
    for decoding, by_set in summary["tables"].items():
        for name, found in by_set.items():
            lines += [f"### {decoding} decoding, test set `{name}`", ""]
            lines += method_lines(found["methods"]) + [""] + difference_lines(found["differences"]) + [""]
    lines += [
        f"Preset `{summary['preset']}` ({', '.join(summary['config'])} {' '.join(summary['fit_args'])}); "
        f"training seeds {summary['train_seeds']}; sampled: each run scored under generation seeds "
        f"{summary['generation_seeds']} (mean over them); greedy: one pass; then mean ± sample std over training "
        "seeds; scores x100. Each metric is also scored against another prompt's references (\"other's\": a fixed "
        "derangement of the set) and the prompt gap is own minus other's: near 0 for an answer that ignores its "
        "prompt. Intervals: 95% paired bootstrap over prompts and training seeds.",
        "Diagnostics: " + "; ".join(f"{key}, {text}" for key, text in DIAGNOSTICS.items()) + ".",
        *(f"Generation ({decoding}): {line}." for decoding, line in summary["protocols"].items() if line),
    ]
    return "\n".join(lines) + "\n"


def column_title(measure: str) -> str:
    """``rougeL_other`` -> "rougeL other's", ``rougeL_gap`` -> "rougeL gap"."""
    return measure.replace("_other", " other's").replace("_gap", " gap")


def method_lines(rows: dict[str, Any]) -> list[str]:
    """One row per method: every measure the rows have, "mean ± std" over training seeds (the mean alone for one)."""
    columns = [key for key in next(iter(rows.values())) if key not in ("seeds", "per_seed")]
    lines = [f"| method | training seeds | {' | '.join(map(column_title, columns))} |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for method, row in rows.items():
        several = len(row["seeds"]) > 1
        cells = [
            "-" if c not in row else f"{row[c]['mean']:.2f}" + (f" ± {row[c]['std']:.2f}" if several else "")
            for c in columns
        ]
        lines.append(f"| {method} | {len(row['seeds']) or '-'} | {' | '.join(cells)} |")
    return lines


def difference_lines(differences: dict[str, Any]) -> list[str]:
    """One row per compared pair: mean difference [95% interval] (seeds whose difference is above 0)."""
    if not differences:
        return []
    measures = list(next(iter(differences.values())))
    lines = [f"| paired difference [95% interval] (seeds > 0) | {' | '.join(map(column_title, measures))} |"]
    lines.append("|---" * (len(measures) + 1) + "|")
    for name, by_measure in differences.items():
        cells = [
            f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] ({d['positive']}/{d['seeds']})"
            if d
            else "-"
            for d in by_measure.values()
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


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


EXCERPT_CHARACTERS = 300


def excerpts(runs: list[Run], prompts: int = 3) -> str:
    """excerpts.md: what each method answered to the same few prompts (greedy when scored, its first training
    seed), so a reader can see whether a score comes from answers or from filler."""
    scored = [run for run in runs if run.results_of("greedy").is_file()]
    decoding = "greedy" if scored else "sampled"
    scored = scored or [run for run in runs if run.results_of("sampled").is_file()]
    if not scored:
        return ""
    first = json.loads(scored[0].results_of(decoding).read_text(encoding="utf-8"))
    test_set, seed = next(iter(first["sets"])), first["seeds"][0]
    count = first["sets"][test_set]["examples"]
    chosen = sorted({round(i * count / prompts) for i in range(prompts)})
    shown: dict[str, Run] = {}
    for run in scored:
        shown.setdefault(run.method, run)  # the teacher, then each method's first training seed
    lines = [
        f"Answers ({decoding} decoding, generation seed {seed}) to prompts {chosen} of test set `{test_set}`.",
        "",
    ]
    for position in chosen:
        records = {
            method: [
                json.loads(line)
                for line in (run.results_of(decoding).parent / f"{test_set}.seed{seed}.jsonl")
                .read_text(encoding="utf-8")
                .splitlines()
            ][position]
            for method, run in shown.items()
        }
        record = next(iter(records.values()))
        lines += [f"#### Prompt {position}", "", "> " + clip(record["prompt"], tail=True), ""]
        lines += [f"Reference: {clip(record['references'][0])}", ""]
        lines += [f"- **{method}**: {clip(r['prediction']) or '(empty)'}" for method, r in records.items()]
        lines.append("")
    return "\n".join(lines)


def clip(text: str, tail: bool = False) -> str:
    """One line of at most EXCERPT_CHARACTERS characters: the start, or with ``tail`` the end (a rendered prompt's
    end is the question; its start is the template's system message)."""
    text = " ".join(text.split())
    if len(text) <= EXCERPT_CHARACTERS:
        return text
    keep = EXCERPT_CHARACTERS - 3
    return "..." + text[-keep:] if tail else text[:keep] + "..."


def finished_runs(preset: Preset, out: Path) -> list[Run]:
    """The teacher and every run of the preset scored under its first decoding, in plan order."""
    teacher = Run(TEACHER, None, out / TEACHER)
    return [run for run in [teacher, *plan(preset, out)] if run.results_of(preset.decodings[0]).is_file()]


def only(preset: Preset, methods: str | None, decodings: str | None = None, teacher: bool = True) -> Preset:
    """The preset restricted to some of its methods (``--methods a,b``) and decodings (``--decodings greedy``), and
    without the teacher's scoring (``--no-teacher``), to run the comparison that matters first; the rest can follow in
    a later run."""
    return dataclasses.replace(
        preset,
        methods=chosen_of(preset, "methods", methods),
        decodings=chosen_of(preset, "decodings", decodings),
        score_teacher=preset.score_teacher and teacher,
    )


def chosen_of(preset: Preset, field_name: str, listed: str | None) -> list[str]:
    """The preset's values of one list field, or those named in a comma-separated option (each must be one)."""
    offered = getattr(preset, field_name)
    if not listed:
        return offered
    chosen = [item.strip() for item in listed.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in offered]
    if unknown:
        raise SystemExit(f"replicate: --{field_name} {unknown} not in preset {preset.name!r}: {offered}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="replicate", description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a preset of configs/replicate/ (cpu, gpu, tiny, cpu-evidence, ...)")
    parser.add_argument("--out", type=Path, help="output folder; default logs/replicate/<preset>")
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from finished runs only")
    parser.add_argument(
        "--methods", help="comma-separated: train and score only these of the preset's methods now; the table "
        "still covers every finished run"
    )  # fmt: skip
    parser.add_argument(
        "--decodings", help="comma-separated: score only under these of the preset's decodings now (greedy, "
        "sampled); the others can be scored by a later run"
    )  # fmt: skip
    parser.add_argument(
        "--no-teacher", action="store_true", help="do not score the teacher now (on this CPU its scoring takes about "
        "as long as a student's fit); a later run without the option scores it"
    )  # fmt: skip
    parser.add_argument("--in-process", action="store_true", help="run the CLI steps in this process (tests)")
    options = parser.parse_args(argv)
    preset = Preset.load(options.preset)
    out = (options.out or ROOT / "logs" / "replicate" / preset.name).resolve()
    if not options.table_only:
        run_all(
            only(preset, options.methods, options.decodings, not options.no_teacher), out, options.in_process
        )
    runs = finished_runs(preset, out)
    summary = summarise(preset, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown(summary)
    (out / "results.md").write_text(table, encoding="utf-8")
    written = figures(summary, runs, out, preset.curve)
    (out / "excerpts.md").write_text(excerpts(runs), encoding="utf-8")
    written.append(out / "excerpts.md")
    print(f"\n{table}\nwritten: {out / 'results.json'}, {out / 'results.md'}, {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
