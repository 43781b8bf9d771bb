"""Teacher targets computed once (model.teacher_targets): step time, memory, bytes and the top-k approximation.

speed    one process, one set of random models and one batch at the embedded default's shapes, timed in
         interleaved rounds (medians): the live teacher vs cached hidden states vs cached top-k targets (each k
         of --k). The cached variants read their targets from a real cache folder in every step, as training
         does. Same objective for every variant (configs/default.yaml's loss), bf16 autocast unless --fp32.
memory   each variant in its own process: peak resident memory *during* training steps (sampled every 5 ms,
         after the build and after the teacher's weights are freed as a fit frees them), live vs hidden vs
         topk, at the default's shapes or at GPT-2 1.5B -> 124M (--workload gpt2; random weights).
bytes    bytes per supervised token of each kind, from the layouts (no model): the default and GPT-2 1.5B.
approx   the real embedded default (SmolLM2-135M teacher, its 12-block student, the bundled validation split):
         the top-k loss and gradient against the exact ones for each k of --k, fp32.

python benchmarks/teacher_targets.py speed --k 64 256
python benchmarks/teacher_targets.py memory --workload gpt2
python benchmarks/teacher_targets.py approx --k 16 64 256
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
import psutil
import torch
import yaml
from harness import REPO, make_batch, synchronize
from train_speed import WORKLOADS

from distillens.data.collate import TrainingCollator
from distillens.losses import IGNORE_INDEX
from distillens.teacher_cache import (
    TEACHER_TARGETS,
    TeacherCache,
    TeacherTargets,
    TeacherView,
    build,
    strip_blocks,
)

DEFAULT = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__)
    parser.add_argument("mode", choices=("speed", "memory", "bytes", "approx"))
    parser.add_argument("--workload", choices=("default", "gpt2", "tiny"), default="default")
    parser.add_argument("--k", type=int, nargs="+", default=[64, 256], help="top-k sizes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="memory: training steps measured")
    parser.add_argument("--fp32", action="store_true", help="speed/memory in fp32 instead of bf16 autocast")
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--exact-lens", action="store_true", help="every layer pair in every step (the paper's objective) instead of "
        "the default's one drawn pair",
    )  # fmt: skip
    parser.add_argument("--max-batches", type=int, default=8, help="approx: validation batches")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # memory: the variant a child process measures
    return parser.parse_args(argv)


def variants(ks: list[int]) -> list[tuple[str, int]]:
    return [("live", 0), ("hidden", 0), *(("topk", k) for k in ks)]


def name_of(kind: str, k: int) -> str:
    return f"topk{k}" if kind == "topk" else kind


# ------------------------------------------------------------------------------------------------ the module


def random_module(workload_name: str, exact_lens: bool = False):
    """The benchmark's DistillationModule: random models of the workload's shapes, the default's objective."""
    workload = WORKLOADS[workload_name]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = str(harness.scratch_tokenizer(Path(folder)))
        student = {**workload.student, "tokenizer": tokenizer}
        teacher = {"config": workload.teacher, "tokenizer": tokenizer}
        loss = {**DEFAULT["model"]["loss"], "chunk_size": 256}
        if exact_lens:
            loss["lens_pairs_per_step"] = None
        module = harness.build_module(student, teacher, loss, workload, "cpu")
    return module, workload


def batch_rows(batch: dict) -> list[dict]:
    """The synthetic batch as tokenised rows (prompt, then response), for a cache build."""
    rows = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        rows.append({"input_ids": ids, "prompt_length": prompt})
    return rows


def cache_for(module, rows, kind: str, k: int, folder: Path, autocast) -> TeacherCache:
    targets = TeacherTargets(kind=kind, k=k)
    view = TeacherView.of(module.objective)
    build(folder, targets, view, {"train": rows}, TrainingCollator(0), len(rows), device=torch.device("cpu"),
          forward_context=autocast, temperature=module.loss_config.temperature)  # fmt: skip
    return TeacherCache(folder, kind, view.layers, view.depth)


def indexed(batch: dict, rows: list[dict]) -> dict:
    """The batch as the training loader gives it: collated from the rows, with each row's index."""
    return TrainingCollator(0)([{**row, "index": i} for i, row in enumerate(rows)]) | {
        k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")
    }


def step(module, optimizer, batch, cache: TeacherCache | None, autocast) -> float:
    """One training step; a cached variant reads its targets from the cache first (part of its time)."""
    if cache is not None:
        batch = {**batch, TEACHER_TARGETS: cache.targets(batch, "train")}
    loss = harness.train_step(module, optimizer, batch, autocast)
    module._window_batches = 0
    return loss


# ------------------------------------------------------------------------------------------------ speed


def speed(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    module, workload = random_module(args.workload, args.exact_lens)
    autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32)  # noqa: E731
    vocab = module.student.config.vocab_size
    raw = make_batch(workload.batch, workload.tokens, vocab, workload.supervised, "cpu")
    rows = batch_rows(raw)
    batch = indexed(raw, rows)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    folder = Path(tempfile.mkdtemp())
    caches, build_seconds = {}, {}
    for kind, k in variants(args.k):
        if kind != "live":
            start = time.perf_counter()
            caches[kind, k] = cache_for(module, rows, kind, k, folder / name_of(kind, k), autocast)
            build_seconds[kind, k] = time.perf_counter() - start
    results = {v: [] for v in variants(args.k)}
    for v in results:  # warm-up: compilation, allocator
        step(module, optimizer, batch, caches.get(v), autocast)
    for round_ in range(args.rounds):
        order = list(results) if round_ % 2 == 0 else list(results)[::-1]
        for v in order:
            synchronize("cpu")
            start = time.perf_counter()
            step(module, optimizer, batch, caches.get(v), autocast)
            results[v].append(time.perf_counter() - start)
        print(f"  round {round_ + 1}/{args.rounds} done", flush=True)
    live = statistics.median(results["live", 0])
    return [
        {"variant": name_of(*v), "seconds_per_step": statistics.median(s), "speedup_vs_live": live / statistics.median(s),
         "cache_build_seconds_for_one_batch": build_seconds.get(v)}
        for v, s in results.items()
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ memory


class RssSampler:
    """The process's largest resident set while it runs, sampled every 5 ms."""

    def __enter__(self) -> RssSampler:
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def memory_one(args: argparse.Namespace) -> dict:
    """One variant in this process: build, build its cache, free what a fit frees, then measure the steps."""
    kind, k = (args.run_one, 0) if not args.run_one.startswith("topk") else ("topk", int(args.run_one[4:]))
    torch.manual_seed(0)
    module, workload = random_module(args.workload)
    autocast = lambda: torch.autocast("cpu", torch.bfloat16, enabled=not args.fp32)  # noqa: E731
    raw = make_batch(
        workload.batch, workload.tokens, module.student.config.vocab_size, workload.supervised, "cpu"
    )
    rows = batch_rows(raw)
    batch = indexed(raw, rows)
    cache = None
    if kind != "live":
        cache = cache_for(module, rows, kind, k, Path(tempfile.mkdtemp()) / "cache", autocast)
        objective = module.objective
        strip_blocks(objective.teacher_lens.blocks if kind == "hidden" else [module.teacher])
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed teacher pages back to the system
    held = psutil.Process().memory_info().rss
    with RssSampler() as sampler:
        for _ in range(args.steps):
            step(module, optimizer, batch, cache, autocast)
    teacher_bytes = sum(p.numel() * p.element_size() for p in module.teacher.parameters() if not p.is_meta)
    return {"variant": args.run_one, "rss_before_steps": held, "peak_rss_during_steps": sampler.peak,
            "teacher_bytes_in_memory": teacher_bytes}  # fmt: skip


def memory(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    return [harness.spawn(__file__, name_of(*v), argv, timeout=3600) for v in variants(args.k)]


# ------------------------------------------------------------------------------------------------ bytes


def bytes_rows(ks: list[int]) -> list[dict]:
    """Bytes per supervised token of each kind (the layouts of teacher_cache.py: hidden in bf16 or fp32, top-k
    as fp32 log-probabilities, int32 ids and one fp32 tail per layer), at the default's and GPT-2 1.5B's shapes."""
    shapes = {
        "default (SmolLM2-135M teacher, 5 pairs)": (576, len(DEFAULT["model"]["layers"]["teacher"])),
        "GPT-2 1.5B teacher, 5 pairs": (1600, 5),
    }
    rows = []
    for shape, (width, pairs) in shapes.items():
        layers = pairs + 1  # the paired layers and the last one
        rows.append({"shape": shape, "kind": "hidden bf16", "bytes_per_token": layers * width * 2})
        rows.append({"shape": shape, "kind": "hidden fp32", "bytes_per_token": layers * width * 4})
        rows += [{"shape": shape, "kind": f"topk{k}", "bytes_per_token": layers * (8 * k + 4)} for k in ks]
    return rows


# ------------------------------------------------------------------------------------------------ approximation


def approx(args: argparse.Namespace) -> list[dict]:
    """Top-k against exact on the real default's validation batches: relative loss and gradient differences."""
    from distillens.data import InstructionDataModule
    from distillens.module import DistillationModule

    module = DistillationModule(**DEFAULT["model"])
    data = InstructionDataModule(**DEFAULT["data"])
    data.connect(module.tokenizer)
    data.setup("fit")
    module.configure_model()
    params = [p for p in module.parameters() if p.requires_grad]
    batches = [b for _, b in zip(range(args.max_batches), data.val_dataloader(), strict=False)]
    rows_split = data.splits["validation"]
    results = []
    caches = {k: None for k in args.k}
    folder = Path(tempfile.mkdtemp())
    for k in args.k:
        targets, view = TeacherTargets(kind="topk", k=k), TeacherView.of(module.objective)
        build(folder / f"k{k}", targets, view, {"validation": rows_split}, TrainingCollator(data.pad_token_id),
              data.batch_size, device=torch.device("cpu"), forward_context=contextlib.nullcontext)  # fmt: skip
        caches[k] = TeacherCache(folder / f"k{k}", "topk", view.layers, view.depth)

    def loss_and_grad(batch) -> tuple[dict, torch.Tensor]:
        module.zero_grad()
        terms = module.objective(batch, training=False)  # every term, every pair, exactly
        (terms.total() / terms.tokens).backward()
        grad = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        return {name: float(terms[name] / terms.tokens) for name in ("kd", "lens")}, grad

    exact = [loss_and_grad(b) for b in batches]
    for k, cache in caches.items():
        row = {
            "k": k,
            "kd_exact": 0.0,
            "kd_topk": 0.0,
            "lens_exact": 0.0,
            "lens_topk": 0.0,
            "grad_rel_diff": [],
        }
        for batch, (exact_terms, exact_grad) in zip(batches, exact, strict=True):
            terms, grad = loss_and_grad({**batch, TEACHER_TARGETS: cache.targets(batch, "validation")})
            for name in ("kd", "lens"):
                row[f"{name}_exact"] += exact_terms[name] / len(batches)
                row[f"{name}_topk"] += terms[name] / len(batches)
            row["grad_rel_diff"].append(float((grad - exact_grad).norm() / exact_grad.norm()))
        row["grad_rel_diff"] = statistics.mean(row["grad_rel_diff"])
        results.append(row)
    return results


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run_one:
        harness.ran_as_child(args, memory_one)
        return {}
    rows = {
        "speed": lambda: speed(args),
        "memory": lambda: memory(args, argv),
        "bytes": lambda: bytes_rows(args.k),
        "approx": lambda: approx(args),
    }[args.mode]()
    for row in rows:
        print(
            "  ".join(
                f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                for key, value in row.items()
            )
        )
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    lens = "_exact" if args.exact_lens else ""
    harness.save_record(args.out, f"teacher_targets_{args.mode}_{args.workload}{lens}.json", record)
    return record


if __name__ == "__main__":
    main()
