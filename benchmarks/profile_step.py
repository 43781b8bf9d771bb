"""Profile of one training step of any config: where the time goes, and how close each part runs to the FLOP limit.

Builds the config's model and data exactly as `distillens fit` does (LightningCLI, not run), then times each part of
a step on the config's own training batches, in rounds (the table reports medians):

    data            the next training batch from the config's loader
    teacher fwd     the frozen teacher's forward to its captured layers (no logits)
    student fwd     the student's forward, capturing the lens layers
    ce / kd / lens  each loss term as training computes it (the chunked terms include their own gradient computation,
                    done chunk by chunk during the forward); lens uses the configured draw of pairs and tokens
    lens s<i>_t<j>  each layer pair alone (a breakdown of lens, not added to the step)
    mse             the MSE feature baseline, when weighted
    backward        the backward through the student from the weighted objective
    optimizer       AdamW's update

Each part's FLOPs (matrix products and attention, counted by torch.utils.flop_counter's formulas) give its achieved
GFLOP/s. The sum of the timed terms is checked against the module's own objective on the same batch (their difference
is printed), so the profile cannot drift from what training computes. The precision is the config's
(``--trainer.precision bf16-mixed`` runs under autocast, as Lightning does). ``--grad-check`` also compares the
objective and its gradient in bf16-mixed against fp32 on the first batch.

    python benchmarks/profile_step.py --config configs/default.yaml                # or: make profile
    python benchmarks/profile_step.py --config configs/default.yaml --trainer.precision bf16-mixed --grad-check

Any other option is passed to the CLI (``--model.loss.lens_pairs_per_step 1`` ...). Output: a table, and JSON under
logs/bench/profile_<config name>_<precision>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import harness
import torch
from harness import FlopCounter


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = harness.parser(__doc__)
    parser.add_argument(
        "--config", action="append", required=True, help="config file(s), as for distillens fit"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed steps (after one untimed step)")
    parser.add_argument("--grad-check", action="store_true", help="bf16-mixed vs fp32 objective and gradient")
    return parser.parse_known_args(argv)


def build(configs: list[str], overrides: list[str]):
    """The config's module (models built) and data module, with the trainer's precision; nothing is run."""
    from distillens.data import InstructionDataModule
    from distillens.lightning_cli import DistillensCLI
    from distillens.module import DistillationModule

    args = [arg for config in configs for arg in ("--config", config)]
    args += ["--trainer.logger", "false", *overrides]
    with mock.patch.object(sys, "argv", ["profile_step"]):
        cli = DistillensCLI(
            DistillationModule, InstructionDataModule, args=args, run=False, auto_configure_optimizers=False
        )
    module, data, precision = cli.model, cli.datamodule, str(cli.trainer.precision)
    module.configure_model()
    if precision == "bf16-true":
        module.to(torch.bfloat16)
        module.teacher.to(torch.bfloat16)
    elif precision not in ("32-true", "32", "bf16-mixed"):
        raise SystemExit(
            f"profile_step: trainer.precision={precision!r}: use 32-true, bf16-mixed or bf16-true"
        )
    module.teacher.eval()
    data.setup("fit")
    return module.train(), data, precision


def autocast_for(precision: str):
    return torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed")


class Step:
    """One training step split into parts, each callable on its own, sharing the state of the step in progress."""

    def __init__(self, module, batch, precision: str, optimizer) -> None:
        self.module, self.batch, self.precision, self.optimizer = module, batch, precision, optimizer
        self.state: dict = {}

    def teacher_forward(self) -> None:
        objective, inputs = self.module.objective, self.inputs()
        with torch.no_grad(), autocast_for(self.precision):
            layers = objective.teacher_layers + [objective.teacher_lens.num_layers]
            with objective.teacher_lens.capture(layers) as hidden:
                self.module.teacher(**inputs, use_cache=False, logits_to_keep=1)
        self.state["t_hidden"] = {
            j: h[:, :-1] for j, h in hidden.items()
        }  # (B, T-1, d_t) aligned with the mask

    def student_forward(self) -> None:
        objective, inputs = self.module.objective, self.inputs()
        need_logits = bool(self.module.loss_config.ce_weight)
        with autocast_for(self.precision):
            layers = objective.student_layers + [objective.student_lens.num_layers]
            with objective.student_lens.capture(layers) as hidden:
                out = self.module.student(**inputs, use_cache=False, logits_to_keep=0 if need_logits else 1)
        self.state["s_hidden"] = {i: h[:, :-1] for i, h in hidden.items()}  # (B, T-1, d_s)
        self.state["logits"] = out.logits

    def term(self, name: str, pairs: list[int] | None = None) -> torch.Tensor:
        """The token sum of one term, by the objective's own routines (``pairs``: those lens pairs only)."""
        from distillens.objective import cross_entropy_sum, float32_default_dtype
        from distillens.sampling import LensDraw

        objective, mask = self.module.objective, self.mask()
        s_hidden, t_hidden = self.state["s_hidden"], self.state["t_hidden"]
        with autocast_for(self.precision), float32_default_dtype():
            if name == "ce":
                return cross_entropy_sum(self.state["logits"][:, :-1], self.batch["labels"][:, 1:])
            if name == "kd":
                s, t = objective.student_lens.num_layers, objective.teacher_lens.num_layers
                return objective.final_layer_sum(s_hidden[s], t_hidden[t], mask)
            if name == "mse":
                return objective.mse_sum(s_hidden, t_hidden, mask)
            draw = objective.lens_draw(mask, True, 0)  # training's draw (the sampled lens, when configured)
            if pairs is not None:
                draw = LensDraw(pairs=pairs, mask=mask, token_scale=1.0)
            return objective.lens_sum(s_hidden, t_hidden, draw)[0]

    def backward(self) -> None:
        (self.state["objective"] / self.mask().sum().clamp_min(1)).backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def inputs(self) -> dict:
        return {k: self.batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in self.batch}

    def mask(self):
        from distillens.losses import IGNORE_INDEX

        return self.batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1)


def active_terms(module) -> list[str]:
    weights = module.loss_config.weights
    return [n for n, weight in weights.items() if weight and (n != "lens" or module.objective.student_layers)]


def parts_of(step: Step, loader_iter) -> list[tuple[str, Callable[[], object], bool]]:
    """(name, call, counts toward the step) in execution order."""
    module, terms = step.module, active_terms(step.module)
    weights = module.loss_config.weights

    def data() -> None:
        step.batch = next(loader_iter)

    def objective() -> None:  # the weighted sum of the terms timed just before (no work of its own)
        step.state["objective"] = sum(weights[n] * step.state[n] for n in terms)

    def timed_term(name: str):
        return lambda: step.state.__setitem__(name, step.term(name))

    parts = [("data", data, True), ("teacher fwd", step.teacher_forward, True)]
    parts += [("student fwd", step.student_forward, True)]
    parts += [(name, timed_term(name), True) for name in terms]
    if "lens" in terms:
        pairs = zip(module.objective.student_layers, module.objective.teacher_layers, strict=True)
        for p, (i, j) in enumerate(pairs):
            parts.append((f"  lens s{i}_t{j}", lambda p=p: step.term("lens", pairs=[p]), False))
    parts += [("objective", objective, False), ("backward", step.backward, True)]
    parts += [("optimizer", step.optimizer_step, True)]
    return parts


def batches(data):
    """The config's training batches, epoch after epoch."""
    while True:
        yield from data.train_dataloader()


def run_step(parts, record: dict | None, counter: bool = False) -> None:
    """Run every part once; record its seconds (or its FLOPs under a counter)."""
    for name, call, _ in parts:
        with FlopCounter() if counter else contextlib.nullcontext() as flops:
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
        if record is not None:
            record.setdefault(name, []).append(flops.flops if counter else elapsed)


def grad_check(module, batch) -> dict:
    """The module's objective (token mean) and gradient in fp32 and under bf16 autocast, on the same weights."""
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        module.zero_grad(set_to_none=True)
        with autocast_for(precision):
            loss = harness.token_mean_objective(module, batch)
        loss.backward()
        grads = {
            name: p.grad.detach().float().clone()
            for name, p in module.named_parameters()
            if p.grad is not None
        }
        results[precision] = (float(loss.detach()), grads)
    module.zero_grad(set_to_none=True)
    (loss32, g32), (loss16, g16) = results["32-true"], results["bf16-mixed"]
    relative = {name: float((g16[name] - g).norm() / g.norm().clamp_min(1e-30)) for name, g in g32.items()}
    worst = max(relative, key=relative.get)
    flat32 = torch.cat([g.flatten() for g in g32.values()]).double()  # fp64: sums over 10^8 squares
    flat16 = torch.cat([g.flatten() for g in g16.values()]).double()
    return {
        "loss_fp32": loss32,
        "loss_bf16_mixed": loss16,
        "loss_relative_difference": abs(loss16 - loss32) / abs(loss32),
        "max_tensor_relative_gradient_difference": relative[worst],
        "worst_tensor": worst,
        "median_tensor_relative_gradient_difference": statistics.median(relative.values()),
        "whole_gradient_relative_difference": float((flat16 - flat32).norm() / flat32.norm()),
        "gradient_cosine": float(torch.nn.functional.cosine_similarity(flat16, flat32, dim=0)),
    }


def table(rows: list[dict], step_seconds: float) -> str:
    lines = [f"{'part':<16} {'seconds':>8} {'share':>6} {'GFLOP':>8} {'GFLOP/s':>8}"]
    for r in rows:
        share = f"{r['seconds'] / step_seconds:>6.1%}" if r["in_step"] else f"{'':>6}"
        rate = f"{r['gflop'] / r['seconds']:>8.1f}" if r["gflop"] and r["seconds"] > 0 else f"{'-':>8}"
        lines.append(f"{r['part']:<16} {r['seconds']:>8.3f} {share} {r['gflop']:>8.1f} {rate}")
    lines.append(f"{'step':<16} {step_seconds:>8.3f} {1:>6.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args(argv)
    module, data, precision = build(args.config, overrides)
    loader = batches(data)
    first = next(loader)
    step = Step(module, first, precision, torch.optim.AdamW(module.student.parameters(), lr=1e-12))
    report: dict = {"configs": args.config, "overrides": overrides, "precision": precision}
    report["torch_threads"] = torch.get_num_threads()
    if args.grad_check:
        report["grad_check"] = grad_check(module, first)
        print(json.dumps(report["grad_check"], indent=2), flush=True)
    parts = parts_of(step, loader)
    flops: dict = {}
    run_step(parts, None)  # warm-up
    run_step(parts, flops, counter=True)
    timing: dict = {}
    for round_ in range(args.rounds):
        run_step(parts, timing)
        print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
    with torch.no_grad(), autocast_for(precision):  # the same batch through the module's own forward
        terms = module(step.batch)
        reference = float(terms.total())
    module_difference = abs(float(step.state["objective"].detach()) - reference) / max(abs(reference), 1e-30)
    rows = [
        {
            "part": name,
            "seconds": statistics.median(timing[name]),
            "gflop": flops[name][0] / 1e9,
            "in_step": in_step,
        }
        for name, _, in_step in parts
    ]
    step_seconds = sum(r["seconds"] for r in rows if r["in_step"])
    batch = step.batch["input_ids"].shape
    supervised = int(step.mask().sum())
    report |= {
        "rows": rows,
        "step_seconds": step_seconds,
        "module_objective_relative_difference": module_difference,
    }
    report |= {"last_batch": {"rows": batch[0], "length": batch[1], "supervised_tokens": supervised}}
    print(
        f"one training step, {precision}, last batch {batch[0]} x {batch[1]} tokens ({supervised} supervised); "
        f"median of {args.rounds} rounds; torch threads {torch.get_num_threads()}"
    )
    print(table(rows, step_seconds))
    print(
        f"terms vs the module's own objective on the last batch: relative difference {module_difference:.2e}"
    )
    harness.save_record(args.out, f"profile_{Path(args.config[-1]).stem}_{precision}.json", report)
    return report


if __name__ == "__main__":
    main()
