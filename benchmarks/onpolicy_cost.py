"""What on-policy training costs and does on the embedded default: student fractions 0, 0.5 and 1 side by side.

1. Speed, in one process (``--rounds``): the config's real teacher, student and training batches (built as
   ``make profile`` builds them), one training step (forward, the student's generation when drawn, backward; in the
   config's precision) under each fraction in interleaved rounds: each round takes the next training batch and
   times every fraction on it, so a loaded machine slows them alike. A first round is untimed. Reported per
   fraction: the mean step time, the mean generation time per step, the share of steps that generated, and the mean
   generated length.
2. Effect (``--steps N``; 0 skips it): for each fraction, ``distillens fit`` of the same configs for N steps, then one
   validation (the default's 32 validation examples): val/loss, val/kd, val/lens and the fit's wall time.

    python benchmarks/onpolicy_cost.py                          # configs/default.yaml + configs/onpolicy/default.yaml
    python benchmarks/onpolicy_cost.py --rounds 4 --steps 8     # what README's table was measured with
    python benchmarks/onpolicy_cost.py --config configs/tiny.yaml --rounds 1 --steps 0   # seconds: checks the script

Results: a table, and JSON under ``--out`` (default logs/bench/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml
from profile_step import autocast_for, build

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    str(REPO / "configs" / "default.yaml"),
    str(REPO / "configs" / "onpolicy" / "default.yaml"),
]
FRACTIONS = (0.0, 0.5, 1.0)
SCORES = ("val/loss", "val/kd", "val/lens", "val/ce")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", help="config file(s), as for distillens fit")
    parser.add_argument("--rounds", type=int, default=4, help="timed rounds (after one untimed round)")
    parser.add_argument("--steps", type=int, default=8, help="steps of each short fit; 0 skips the fits")
    parser.add_argument("--out", default=str(REPO / "logs" / "bench"), help="folder of the JSON and the fits")
    return parser.parse_args(argv)


def time_steps(configs: list[str], rounds: int) -> dict[float, dict]:
    """Interleaved timing of one training step under each student fraction (see the module docstring)."""
    from distillens.onpolicy import OnPolicyConfig, RolloutWindow

    module, data, precision = build(configs, [])
    base = module.on_policy
    batches = iter(data.train_dataloader())
    rows = {
        f: {"seconds": [], "gen_seconds": [], "generated": 0, "answers": 0, "tokens": 0} for f in FRACTIONS
    }
    for index in range(rounds + 1):
        batch = next(batches)
        for fraction in FRACTIONS:
            module.on_policy = OnPolicyConfig(
                **{**vars(base), "student_fraction": fraction, "teacher_fraction": 0}
            )
            module.rollouts, module._window_batches = (
                RolloutWindow(),
                index,
            )  # a draw per round, as micro-batches
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with warnings.catch_warnings(), autocast_for(precision):
                warnings.simplefilter("ignore")  # self.log without a trainer
                loss = module.training_step(batch, index)
            loss.backward()
            seconds = time.perf_counter() - start
            if index == 0:
                continue  # warm-up
            row, window = rows[fraction], module.rollouts
            row["seconds"].append(seconds)
            row["gen_seconds"].append(window.seconds)
            row["generated"] += int(window.answers > 0)
            row["answers"] += window.answers
            row["tokens"] += window.tokens
        print(f"round {index}: " + ", ".join(f"{f}: {rows[f]['seconds'][-1:] or '-'}" for f in FRACTIONS))
    return {
        f: {
            "step_s": statistics.fmean(row["seconds"]),
            "gen_s": statistics.fmean(row["gen_seconds"]),
            "steps_generating": f"{row['generated']}/{rounds}",
            "gen_length": row["tokens"] / row["answers"] if row["answers"] else None,
            "seconds": row["seconds"],
        }
        for f, row in rows.items()
    }


def short_fit(configs: list[str], fraction: float, steps: int, out: Path) -> dict:
    """``distillens fit`` for ``steps`` steps with this student fraction, validated once at the end, no checkpoints."""
    overlay = out / "fit-overlay.yaml"
    callbacks = [{"class_path": "distillens.callbacks.InitialValidation"}]
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "enable_checkpointing": False}}))
    name = f"fraction{fraction:g}"
    command = [
        str(Path(sys.executable).with_name("distillens")), "fit",
        *(arg for config in configs for arg in ("--config", config)), "--config", str(overlay),
        "--model.on_policy.student_fraction", str(fraction), "--model.on_policy.teacher_fraction", "0",
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.logger.init_args.save_dir", str(out), "--trainer.logger.init_args.name", name,
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    start = time.perf_counter()
    with (out / f"{name}.log").open("w") as log:
        subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.perf_counter() - start
    scalars = read_scalars(out / name)
    final = {k: v[max(v)] for k, v in scalars.items() if k in SCORES}
    lengths = list(scalars.get("train/gen_length", {}).values())
    return {
        "fit_s": wall,
        **final,
        "val/loss_step0": scalars["val/loss"][0],
        "gen_length": statistics.fmean(lengths) if lengths else None,
    }


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for name in events.Tags()["scalars"]:
            found.setdefault(name, {}).update({e.step: e.value for e in events.Scalars(name)})
    return found


def table(speed: dict, fits: dict) -> str:
    lines = [
        "| student fraction | step time (s) | generation per step (s) | steps generating | mean generated length "
        "| val/loss after the fit | val/kd | val/lens | fit wall time (s) |",
        "|---" * 9 + "|",
    ]
    for f in FRACTIONS:
        s, fit = speed[f], fits.get(f, {})
        length = f"{s['gen_length']:.1f}" if s["gen_length"] is not None else "-"
        scores = [f"{fit[k]:.4f}" if k in fit else "-" for k in ("val/loss", "val/kd", "val/lens")]
        wall = f"{fit['fit_s']:.0f}" if fit else "-"
        lines.append(
            f"| {f:g} | {s['step_s']:.2f} | {s['gen_s']:.2f} | {s['steps_generating']} | {length} | "
            f"{' | '.join(scores)} | {wall} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    configs = args.config or DEFAULT_CONFIGS
    out = Path(args.out) / "onpolicy"
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    speed = time_steps(configs, args.rounds)
    fits = {f: short_fit(configs, f, args.steps, out) for f in FRACTIONS} if args.steps else {}
    record = {"configs": configs, "rounds": args.rounds, "steps": args.steps, "speed": speed, "fits": fits}
    (out / "onpolicy.json").write_text(json.dumps(record, indent=2, default=str))
    print(table(speed, fits))
    print(f"written to {out / 'onpolicy.json'}")
    return record


if __name__ == "__main__":
    main()
