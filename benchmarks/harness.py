"""What the benchmarks share: their command line, random models and batches, one variant per child process, timing
and memory readings, FLOP counting, and the JSON record under logs/bench/.

A benchmark that compares peak memory runs each variant in its own process (``spawn``: the script again, with
``--run-one VARIANT``), so that a variant's peak is its own and an out-of-memory kill is a result row, not a crash.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from distillens.allocator import keep_freed_memory

keep_freed_memory()  # every benchmark measures the host allocator that training uses (distillens.cli.main)

REPO = Path(__file__).resolve().parents[1]
BENCH_OUT = REPO / "logs" / "bench"
# no dropout: variants then see the same computation and their losses can be compared
GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
GPT2 |= {"attn_pdrop": 0.0}


@dataclass(frozen=True)
class Workload:
    """Teacher and student (config fields or ModelSpec fields), their layer pairs and the batch shape."""

    teacher: dict
    student: dict
    student_layers: list[int]
    teacher_layers: list[int]
    batch: int
    tokens: int


# ----------------------------------------------------------------------------------------------------------------
# Command line and results


def parser(description: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring as the help text, and ``--out``, the folder of its JSON."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=BENCH_OUT, help="folder for the JSON")
    return parser


def save_record(out_dir: Path, name: str, record: dict) -> Path:
    """Write ``record`` as ``out_dir/name`` (indented JSON) and say where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"saved {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return out


def spawn(script: str, variant: str, argv: list[str], timeout: float | None = None) -> dict:
    """Run ``script ARGV --run-one VARIANT`` in a fresh process; its last stdout line (JSON) is the variant's row.

    A failure is a row with an ``error``: the time-out, the kernel's OOM kill, or the last line of stderr.
    """
    command = [sys.executable, script, *argv, "--run-one", variant]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        killed = done.returncode in (-9, 137)  # the kernel's OOM killer on CPU
        return {"variant": variant, "error": "out of memory (killed)" if killed else lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ran_as_child(args: argparse.Namespace, run_one: Callable[[argparse.Namespace], dict]) -> bool:
    """In a process that ``spawn`` started (``args.run_one`` names its variant): run it and print its row as the
    last line of stdout, which ``spawn`` reads. False in the driver process, which does nothing here."""
    if not args.run_one:
        return False
    print(json.dumps(run_one(args)))
    return True


# ----------------------------------------------------------------------------------------------------------------
# Models, batches and steps


def scratch_tokenizer(folder: Path) -> Path:
    """A two-token tokenizer: the module needs one to exist, the benchmarks feed random ids and never decode."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        folder
    )
    return folder


def build_module(student: dict, teacher: dict, loss: dict, workload: Workload, device: str):
    """A DistillationModule of random models (ModelSpec fields), created directly on the device, in train mode."""
    from distillens.module import DistillationModule

    module = DistillationModule(
        student=student,
        teacher=teacher,
        loss=loss,
        layers={"student": workload.student_layers, "teacher": workload.teacher_layers},
    )
    with torch.device(device):
        module.configure_model()
    return module.to(device).train()


def make_batch(rows: int, tokens: int, vocab: int, supervised: float, device: str) -> dict[str, torch.Tensor]:
    """Random tokens; each row's prompt (the first 1 - supervised of it) is masked out of the labels."""
    from distillens.losses import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (rows, tokens), generator=generator)  # (B, T)
    labels = input_ids.clone()  # (B, T)
    labels[:, : int(tokens * (1 - supervised))] = IGNORE_INDEX
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {name: tensor.to(device) for name, tensor in batch.items()}


def token_mean_objective(module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's weighted objective over the batch, divided by its supervised tokens (training's loss)."""
    terms = module(batch)
    return terms.total() / terms["tokens"].clamp_min(1)


def train_step(module, optimizer, batch, autocast: Callable[[], AbstractContextManager]) -> float:
    """Forward (under ``autocast()``), backward and optimizer step on one batch; returns the token-mean objective."""
    with autocast():
        loss = token_mean_objective(module, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------------------------
# Time, memory and FLOPs


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads the work done."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss() -> int:
    """Bytes: the process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: str) -> int:
    """Bytes: max allocated on CUDA since the last reset, else the process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return peak_rss()


class FlopCounter(TorchDispatchMode):
    """Sums the FLOPs of every operator torch.utils.flop_counter has a formula for (matrix products, attention).

    FlopCounterMode itself also tracks modules with backward hooks, which autograd.grad inside the chunked lens
    refuses; the formulas are the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out
