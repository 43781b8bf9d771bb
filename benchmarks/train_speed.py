"""Training-step speed side by side: KD only, DistillLens exact, DistillLens with m sampled pairs, in fp32 and bf16.

All variants share one process, one set of random models and one batch, and are timed in interleaved rounds (each
round times every variant once; the table reports medians), so a loaded machine slows them alike and the ratios stay
meaningful. Only the objective (model.loss) and the precision change between variants:

    kd     final-layer KD only (lens_weight 0)
    exact  DistillLens, every layer pair (the chunked lens)
    m1     DistillLens, one layer pair drawn per step (lens_pairs_per_step 1): an unbiased estimate of the lens term
    eager  DistillLens exact with the divergences' eager kernels (fused false): what the compiled kernels save
    fp32   32-true;  bf16  bf16-mixed (torch.autocast: bf16 matrix products, fp32 weights and divergences)

Each row gives tokens/s, the step-time ratio to KD only at the same precision, the FLOP-limit ratio (the variant's
FLOPs over KD-only's, counted by torch.utils.flop_counter over one step: the best ratio a FLOP-bound step can reach),
the achieved GFLOP/s and, for bf16, the speed-up over fp32. Results: a table, and JSON under logs/bench/.

    python benchmarks/train_speed.py                          # CPU: the embedded default's shapes (SmolLM2-135M 30 -> 6)
    python benchmarks/train_speed.py --workload gpt2 --device cuda   # the paper's GPT-2 1.5B -> 124M shapes
    python benchmarks/train_speed.py --workload tiny          # seconds: checks the benchmark itself
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
import yaml
from harness import GPT2, REPO, FlopCounter, make_batch, synchronize

DEFAULT = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
OBJECTIVES: dict[str, dict] = {
    "kd": {"lens_weight": 0.0},
    "exact": {},
    "m1": {"lens_pairs_per_step": 1},
    "eager": {"fused": False},
}
"""Objective name -> LossConfig fields changed from the workload's DistillLens objective."""
PRECISIONS = {"fp32": False, "bf16": True}
"""Precision name -> whether the step runs under bf16 autocast (Lightning's bf16-mixed)."""


@dataclass(frozen=True)
class Workload(harness.Workload):
    """Random models of given shapes, their layer pairs and the batch shape, and its supervised fraction."""

    supervised: float


SMOLLM2 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)  # fmt: skip
TINY = dict(
    model_type="llama", vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
)  # fmt: skip
WORKLOADS = {
    # configs/default.yaml's student (teacher blocks kept), layer pairs and batch size, read from the file; rows of
    # 128 tokens (about 1,000 tokens a batch, a third of them supervised, as the bundled data gives)
    "default": Workload(
        teacher=SMOLLM2,
        student={"init_from_teacher_layers": DEFAULT["model"]["student"]["init_from_teacher_layers"]},
        student_layers=DEFAULT["model"]["layers"]["student"],
        teacher_layers=DEFAULT["model"]["layers"]["teacher"],
        batch=DEFAULT["data"]["batch_size"],
        tokens=128,
        supervised=0.33,
    ),
    # configs/gpt2.yaml: 124M (12 blocks) <- 1.5B (48 blocks), the paper's pairs
    "gpt2": Workload(
        teacher=GPT2 | {"n_embd": 1600, "n_layer": 48, "n_head": 25},
        student={"config": GPT2 | {"n_embd": 768, "n_layer": 12, "n_head": 12}},
        student_layers=[2, 4, 6, 8, 10],
        teacher_layers=[8, 16, 24, 32, 40],
        batch=4,
        tokens=512,
        supervised=0.5,
    ),
    "tiny": Workload(
        teacher=TINY,
        student={"init_from_teacher_layers": [0, 3]},
        student_layers=[1, 2],
        teacher_layers=[1, 4],
        batch=2,
        tokens=32,
        supervised=0.5,
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument(
        "--workload", choices=list(WORKLOADS), default="default", help="model and batch shapes"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=list(OBJECTIVES))
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (each times every variant once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of every variant first")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per chunk of the chunked losses")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what the ratios use: wall time, or the process's CPU time (with --threads 1, robust on a shared "
        "machine: waiting for a core is not counted)",
    )
    return parser.parse_args(argv)


def build_module(workload: Workload, device: str, folder: Path, chunk_size: int):
    """The DistillationModule (random weights, DistillLens objective) shared by every variant."""
    tokenizer = str(harness.scratch_tokenizer(folder))
    student = {**workload.student, "tokenizer": tokenizer}
    teacher = {"config": workload.teacher, "tokenizer": tokenizer}
    return harness.build_module(student, teacher, {"chunk_size": chunk_size}, workload, device)


def step(module, optimizer, batch, objective: str, bf16: bool) -> float:
    """One training step of a variant: forward (teacher, student, objective), backward, AdamW."""
    config = dataclasses.replace(module.base_loss, **OBJECTIVES[objective])
    # the objective holds its own reference to the config: both switch to the variant's
    module.loss_config = module.objective.config = config
    autocast = lambda: torch.autocast(module.device.type, torch.bfloat16, enabled=bf16)  # noqa: E731
    loss = harness.train_step(module, optimizer, batch, autocast)
    module._window_batches = 0  # as on_before_optimizer_step does: the next step draws afresh
    return loss


def count_flops(module, optimizer, batch, objective: str, bf16: bool) -> int:
    """FLOPs of one step (matrix products and attention, forward and backward)."""
    with FlopCounter() as counter:
        step(module, optimizer, batch, objective, bf16)
    return counter.flops


def measure(args: argparse.Namespace) -> list[dict]:
    """Time every (objective, precision) in interleaved rounds; one row per variant."""
    workload = WORKLOADS[args.workload]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        module = build_module(workload, args.device, Path(folder), args.chunk_size)
    module.base_loss = module.loss_config
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    vocab = module.student.config.vocab_size
    batch = make_batch(workload.batch, workload.tokens, vocab, workload.supervised, args.device)
    variants = [(o, p) for o in args.objectives for p in args.precisions]
    rows = {v: {"objective": v[0], "precision": v[1], "seconds": []} for v in variants}
    for objective, precision in variants:  # warm-up: the first step also counts the FLOPs
        row = rows[objective, precision]
        row["flops"] = count_flops(module, optimizer, batch, objective, PRECISIONS[precision])
        for _ in range(args.warmup - 1):
            step(module, optimizer, batch, objective, PRECISIONS[precision])
        row["cpu_seconds"] = []
    for round_ in range(args.rounds):
        order = variants if round_ % 2 == 0 else variants[::-1]  # no variant always first
        for objective, precision in order:
            row = rows[objective, precision]
            synchronize(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            row["loss"] = step(module, optimizer, batch, objective, PRECISIONS[precision])
            synchronize(args.device)
            row["seconds"].append(time.perf_counter() - start)
            row["cpu_seconds"].append(time.process_time() - start_cpu)
        print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
    tokens = workload.batch * workload.tokens
    for row in rows.values():
        row["wall_seconds_per_step"] = statistics.median(row["seconds"])
        row["cpu_seconds_per_step"] = statistics.median(row["cpu_seconds"])
        row["seconds_per_step"] = row[f"{args.clock}_seconds_per_step"]
        row["tokens_per_sec"] = tokens / row["seconds_per_step"]
        row["gflops_per_sec"] = row["flops"] / row["seconds_per_step"] / 1e9
    for (objective, precision), row in rows.items():
        kd, fp32 = rows.get(("kd", precision)), rows.get((objective, "fp32"))
        row["time_vs_kd"] = row["seconds_per_step"] / kd["seconds_per_step"] if kd else None
        row["flop_limit_vs_kd"] = row["flops"] / kd["flops"] if kd else None
        row["speedup_vs_fp32"] = fp32["seconds_per_step"] / row["seconds_per_step"] if fp32 else None
    return list(rows.values())


def table(rows: list[dict]) -> str:
    ratio = lambda value: "-" if value is None else f"{value:.2f}x"  # noqa: E731
    lines = [
        f"{'objective':<9} {'precision':<9} {'s/step':>7} {'tokens/s':>9} {'time vs kd':>10} "
        f"{'FLOP limit':>10} {'GFLOP/s':>8} {'vs fp32':>8} {'loss':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['objective']:<9} {r['precision']:<9} {r['seconds_per_step']:>7.2f} {r['tokens_per_sec']:>9.0f} "
            f"{ratio(r['time_vs_kd']):>10} {ratio(r['flop_limit_vs_kd']):>10} {r['gflops_per_sec']:>8.1f} "
            f"{ratio(r['speedup_vs_fp32']):>8} {r['loss']:>8.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    print(
        f"training-step speed, workload {args.workload} on {args.device}: {workload.batch} x {workload.tokens} "
        f"tokens ({workload.supervised:.0%} supervised), {len(workload.student_layers)} lens pairs, "
        f"{args.warmup} warm-up step(s) and {args.rounds} interleaved round(s) per variant; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; ratios in {args.clock} time",
        flush=True,
    )
    rows = measure(args)
    print(table(rows))
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "workload": dataclasses.asdict(workload)}
    record["rows"] = rows
    harness.save_record(
        args.out, f"train_speed_{args.workload}_{torch.device(args.device).type}.json", record
    )
    return record


if __name__ == "__main__":
    main()
