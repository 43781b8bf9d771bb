"""Lens-loss benchmark: the published code's naive projection against our chunked lens loss (and Liger if present).

Each variant runs in its own process so that peak memory is its own: peak RSS growth on CPU, max allocated on CUDA,
measured from just before the forward to the end of the backward. The workload is GPT-2 scale (docs/method.md, "What we fixed in the published code"):
5 layer pairs, student hidden 768, teacher hidden 1600, vocabulary 50,257, batch 4 x 256 tokens, half supervised.

    python benchmarks/lens_loss.py                  # every variant, table printed and saved under logs/bench/
    python benchmarks/lens_loss.py --tokens 64      # a smaller workload for a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import harness
import torch
from harness import peak_rss
from torch import nn

from distillens.lens import LogitLens, lens_loss, naive_lens_loss
from distillens.losses import IGNORE_INDEX

VARIANTS = ("naive", "chunked", "liger")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("--pairs", type=int, default=5, help="layer pairs k")
    parser.add_argument("--student-hidden", type=int, default=768)
    parser.add_argument("--teacher-hidden", type=int, default=1600)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="sequence length")
    parser.add_argument("--supervised", type=float, default=0.5, help="fraction of supervised tokens")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per chunk of the chunked lens loss")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--run-one", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: child process
    return parser.parse_args(argv)


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def workload(args: argparse.Namespace):
    """Random hidden states, a mask and GPT-2-shaped lenses (LayerNorm + untied unembedding), all fp32."""
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.tokens)
    student = LogitLens.from_parts(
        nn.LayerNorm(args.student_hidden).to(device),
        nn.Linear(args.student_hidden, args.vocab, bias=False).to(device),
    )
    teacher = LogitLens.from_parts(
        nn.LayerNorm(args.teacher_hidden).to(device),
        nn.Linear(args.teacher_hidden, args.vocab, bias=False).to(device),
    )
    for p in teacher.parameters():
        p.requires_grad_(False)
    s_hidden = [
        torch.randn(*shape, args.student_hidden, generator=gen).to(device).requires_grad_()
        for _ in range(args.pairs)
    ]
    t_hidden = [torch.randn(*shape, args.teacher_hidden, generator=gen).to(device) for _ in range(args.pairs)]
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, int(args.tokens * (1 - args.supervised)) :] = True  # responses follow prompts
    return s_hidden, t_hidden, student, teacher, mask.to(device)


def liger_loss(s_hidden, t_hidden, student, teacher, mask):
    """Liger-Kernel's fused linear JSD over the same rows (the norms applied first, as it only fuses the head)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    labels = torch.where(mask, 0, IGNORE_INDEX).reshape(-1).repeat(len(s_hidden))  # (k*B*T,)
    s_in = student.norm(torch.cat([h.reshape(-1, h.shape[-1]) for h in s_hidden]))  # (k*B*T, d_s)
    t_in = teacher.norm(torch.cat([h.reshape(-1, h.shape[-1]) for h in t_hidden]))  # (k*B*T, d_t)
    fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False)
    return fn(s_in, student.unembedding.weight, t_in, teacher.unembedding.weight, labels), None


def run_one(args: argparse.Namespace) -> dict:
    """Forward + backward of one variant; returns its extra peak memory and wall time."""
    torch.set_num_threads(torch.get_num_threads())
    inputs = workload(args)
    functions = {
        "naive": lambda *a: naive_lens_loss(*a),
        "chunked": lambda *a: lens_loss(*a, chunk_size=args.chunk_size),
        "liger": liger_loss,
    }
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    start = time.perf_counter()
    loss, _ = functions[args.run_one](*inputs)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    extra = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base
    return {"variant": args.run_one, "loss": float(loss), "seconds": seconds, "peak_extra_bytes": extra}


def liger_available() -> bool:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except Exception:
        return False
    return True


def table(rows: list[dict]) -> str:
    naive = next((r for r in rows if r["variant"] == "naive" and "error" not in r), None)
    lines = [
        f"{'variant':<9} {'peak extra':>12} {'time':>9} {'mem vs naive':>13} {'speed vs naive':>15} {'loss':>10}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<9} failed: {r['error']}")
            continue
        mem_ratio = naive["peak_extra_bytes"] / max(r["peak_extra_bytes"], 1) if naive else float("nan")
        speed = naive["seconds"] / r["seconds"] if naive else float("nan")
        lines.append(
            f"{r['variant']:<9} {r['peak_extra_bytes'] / 2**30:>10.2f}Gi {r['seconds']:>8.2f}s "
            f"{mem_ratio:>12.1f}x {speed:>14.2f}x {r['loss']:>10.5f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if harness.ran_as_child(args, run_one):
        return
    variants = [v for v in args.variants if v != "liger" or liger_available()]
    print(
        f"lens loss, {args.pairs} pairs, d_s={args.student_hidden}, d_t={args.teacher_hidden}, V={args.vocab}, "
        f"{args.batch}x{args.tokens} tokens ({args.supervised:.0%} supervised), chunk {args.chunk_size}, "
        f"{args.device}, {torch.get_num_threads()} threads",
        flush=True,
    )
    rows = [harness.spawn(__file__, variant, argv) for variant in variants]
    print(table(rows))
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    harness.save_record(args.out, f"lens_loss_{args.device.split(':')[0]}.json", record)


if __name__ == "__main__":
    main()
