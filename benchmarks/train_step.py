"""Training-step benchmark: final-layer KD only vs DistillLens with the chunked lens vs DistillLens with the naive lens.

The three variants share teacher, student, batch and precision; only the objective differs:
    kd       (a) lens_weight 0: the final-layer divergence alone (through the chunked loss, as in training)
    chunked  (b) DistillLens, lens term chunked (the default)
    naive    (c) DistillLens, lens term as the published code computes it: all (k, B, T, V) logits at once
A step is the module's forward (teacher and student), the backward and an AdamW step. Each variant runs in its own
process, so its peak memory is its own: peak RSS of the process on CPU, max allocated on CUDA. An out-of-memory
error is a result row, not a crash.

    python benchmarks/train_step.py                  # CPU: small GPT-2-shaped models (vocabulary 50,257), fp32
    python benchmarks/train_step.py --device cuda    # GPT-2 1.5B teacher -> 124M student config, 4 x 512, bf16
    python benchmarks/train_step.py --device cuda --batches 4 8 16 32   # also: the largest batch each variant fits

Weights are random (configs only, nothing downloaded). Results are printed as a table and saved as JSON under
logs/bench/. Targets on CUDA: (b) at least 0.8x the tokens per second of (a); (b) fits batches where (c) does not.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
from harness import GPT2, make_batch, peak_memory, synchronize, train_step

VARIANTS: dict[str, dict] = {
    "kd": {"lens_weight": 0.0},
    "chunked": {"lens_impl": "chunked"},
    "naive": {"lens_impl": "naive"},
}
"""Variant name -> LossConfig fields; everything else is shared."""


@dataclass(frozen=True)
class Workload(harness.Workload):
    """Teacher and student configs, layer pairs and the default batch of one device type, and its precision."""

    precision: str


WORKLOADS = {
    # the paper's GPT-2 pairs: 124M (12 blocks) <- 1.5B (48 blocks), S {2,4,6,8,10} / T {8,16,24,32,40}
    "cuda": Workload(
        teacher=GPT2 | {"n_embd": 1600, "n_layer": 48, "n_head": 25},
        student=GPT2 | {"n_embd": 768, "n_layer": 12, "n_head": 12},
        student_layers=[2, 4, 6, 8, 10],
        teacher_layers=[8, 16, 24, 32, 40],
        batch=4,
        tokens=512,
        precision="bf16-true",
    ),
    # the same shape family, small enough for two CPU cores; the vocabulary stays GPT-2's (the lens's cost)
    "cpu": Workload(
        teacher=GPT2 | {"n_embd": 256, "n_layer": 8, "n_head": 4},
        student=GPT2 | {"n_embd": 128, "n_layer": 4, "n_head": 4},
        student_layers=[1, 2, 3],
        teacher_layers=[2, 4, 6],
        batch=2,
        tokens=128,
        precision="32-true",
    ),
}
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (picks the workload)")
    parser.add_argument("--batch", type=int, help="rows per step (default: the workload's)")
    parser.add_argument("--tokens", type=int, help="sequence length (default: the workload's)")
    parser.add_argument(
        "--supervised", type=float, default=0.5, help="fraction of supervised (response) tokens"
    )
    parser.add_argument("--precision", choices=PRECISIONS, help="default: bf16-true on CUDA, 32-true on CPU")
    parser.add_argument("--chunk-size", type=int, default=512, help="rows per chunk of the chunked losses")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument(
        "--batches", type=int, nargs="*", default=[], help="larger batches to try, one step each"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds allowed to each variant's process"
    )
    parser.add_argument(
        "--run-one", choices=list(VARIANTS), help=argparse.SUPPRESS
    )  # internal: child process
    args = parser.parse_args(argv)
    workload = WORKLOADS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.batch = args.batch or workload.batch
    args.tokens = args.tokens or workload.tokens
    args.precision = args.precision or workload.precision
    return args


# ----------------------------------------------------------------------------------------------------------------
# One variant (child process)


def build_module(args: argparse.Namespace, variant: str, tokenizer: Path):
    """The DistillationModule of a variant, its random models created directly on the device."""
    workload = WORKLOADS["cuda" if args.device.startswith("cuda") else "cpu"]
    dtype = "bfloat16" if args.precision == "bf16-true" else "float32"
    spec = lambda config: {"config": config, "tokenizer": str(tokenizer), "dtype": dtype}  # noqa: E731
    loss = {"chunk_size": args.chunk_size, **VARIANTS[variant]}
    return harness.build_module(spec(workload.student), spec(workload.teacher), loss, workload, args.device)


def timed_steps(args, module, optimizer, batch, autocast) -> tuple[float, float]:
    """(seconds per step, last loss) over args.steps steps after args.warmup untimed ones."""
    for _ in range(args.warmup):
        train_step(module, optimizer, batch, autocast)
    synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(module, optimizer, batch, autocast)
    synchronize(args.device)
    return (time.perf_counter() - start) / args.steps, loss


def largest_batch(args, module, optimizer, vocab, autocast) -> tuple[int | None, list[dict]]:
    """Try each of args.batches in turn (one step each); the largest that fits, and each try's outcome."""
    fitted, tries = None, []
    for rows in sorted(args.batches):
        try:
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            batch = make_batch(rows, args.tokens, vocab, args.supervised, args.device)
            train_step(module, optimizer, batch, autocast)
            synchronize(args.device)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            tries.append({"batch": rows, "error": "out of memory"})
            break
        fitted = rows
        tries.append({"batch": rows, "peak_bytes": peak_memory(args.device)})
    return fitted, tries


def run_one(args: argparse.Namespace) -> dict:
    """Build the variant, time its steps at args.batch, then optionally search the largest batch."""
    row = {"variant": args.run_one, "batch": args.batch, "tokens": args.tokens}
    torch.manual_seed(0)  # the same random models in every variant's process
    with tempfile.TemporaryDirectory() as folder:
        module = build_module(args, args.run_one, harness.scratch_tokenizer(Path(folder)))
    vocab = module.student.config.vocab_size
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    bf16_mixed = args.precision == "bf16-mixed"
    device_type = torch.device(args.device).type
    autocast = lambda: torch.autocast(device_type, torch.bfloat16, enabled=bf16_mixed)  # noqa: E731
    try:
        batch = make_batch(args.batch, args.tokens, vocab, args.supervised, args.device)
        seconds, loss = timed_steps(args, module, optimizer, batch, autocast)
    except torch.OutOfMemoryError:
        return row | {"error": "out of memory"}
    row |= {
        "seconds_per_step": seconds,
        "tokens_per_sec": args.batch * args.tokens / seconds,
        "peak_bytes": peak_memory(args.device),
        "loss": loss,
    }
    if args.batches:
        row["max_batch"], row["batch_tries"] = largest_batch(args, module, optimizer, vocab, autocast)
    return row


# ----------------------------------------------------------------------------------------------------------------
# The driver: one process per variant, then the table


def table(rows: list[dict]) -> str:
    kd = next((r for r in rows if r["variant"] == "kd" and "error" not in r), None)
    header = f"{'variant':<9} {'batch':>5} {'tokens/s':>10} {'vs kd':>7} {'peak mem':>10} {'max batch':>10} {'loss':>9}"
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<9} {r.get('batch', ''):>5} {r['error']}")
            continue
        ratio = f"{r['tokens_per_sec'] / kd['tokens_per_sec']:.2f}x" if kd else "-"
        tries = ", ".join(
            f"{t['batch']}:{'OOM' if 'error' in t else format(t['peak_bytes'] / 2**30, '.1f') + 'Gi'}"
            for t in r.get("batch_tries", [])
        )
        lines.append(
            f"{r['variant']:<9} {r['batch']:>5} {r['tokens_per_sec']:>10.0f} {ratio:>7} "
            f"{r['peak_bytes'] / 2**30:>8.2f}Gi {r.get('max_batch') or '-':>10} {r['loss']:>9.4f}"
            + (f"   tries {tries}" if tries else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if harness.ran_as_child(args, run_one):
        return
    workload = WORKLOADS["cuda" if args.device.startswith("cuda") else "cpu"]
    print(
        f"training step on {args.device}, {args.precision}: teacher {workload.teacher['n_layer']} x "
        f"{workload.teacher['n_embd']}, student {workload.student['n_layer']} x {workload.student['n_embd']}, "
        f"V={workload.student['vocab_size']}, {len(workload.student_layers)} lens pairs, {args.batch} x "
        f"{args.tokens} tokens ({args.supervised:.0%} supervised), chunk {args.chunk_size}, "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        flush=True,
    )
    rows = []
    for variant in args.variants:
        rows.append(harness.spawn(__file__, variant, argv, args.timeout))
        print(f"  {variant}: done", flush=True)
    print(table(rows))
    record = {"args": {k: str(v) for k, v in vars(args).items() if k != "run_one"}, "rows": rows}
    harness.save_record(args.out, f"train_step_{torch.device(args.device).type}.json", record)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
