"""bf16 on a CPU without native bf16 arithmetic: run in fp32 instead, and say so in one line.

The embedded default trains in ``bf16-mixed``: on a CPU with AVX-512 BF16 (or AMX) matrix products run about 2.5x
faster than in fp32. On a CPU without those instructions (AVX2 only, e.g. many AMD EPYC and older Intel parts)
PyTorch has no fast bf16 kernel and the same product runs hundreds of times *slower* than in fp32 (a 1024 x 576 by
576 x 49,152 product: 0.7 s in fp32, about 3 minutes in bf16 on such a machine), which turns a 6-second training
step into many minutes. The switch reads the CPU's flags (Linux's /proc/cpuinfo); where they cannot be read, the
configured precision stands, and ``DISTILLENS_KEEP_BF16=1`` keeps it whatever the CPU (the tests set it, so that
they check bf16 on every machine).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
CPUINFO = Path("/proc/cpuinfo")
KEEP_BF16 = "DISTILLENS_KEEP_BF16"


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The flags of the first CPU in /proc/cpuinfo; None where there is no such file (not Linux)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively; True where its flags are unknown (the config stands)."""
    flags = cpu_flags()
    return flags is None or any(flag in flags for flag in NATIVE_BF16_FLAGS)


def runs_on_cpu(accelerator) -> bool:
    """Whether the trainer's ``accelerator`` setting ends up on the CPU ("auto" does without CUDA or MPS)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name == "auto":
        return not torch.cuda.is_available() and not torch.backends.mps.is_available()
    return name.startswith("cpu")


def fall_back_from_slow_bf16(trainer_config) -> None:
    """Set ``trainer.precision`` to 32-true, with one warning, when bf16 would run on a CPU without native bf16."""
    precision = str(trainer_config.get("precision"))
    if precision not in BF16_PRECISIONS or not runs_on_cpu(trainer_config.get("accelerator", "auto")):
        return
    if cpu_has_native_bf16() or os.environ.get(KEEP_BF16) == "1":
        return
    trainer_config["precision"] = "32-true"
    log.warning(
        "trainer.precision=%s: this CPU has no native bf16 (no %s flag), where bf16 matrix products run hundreds of "
        "times slower than fp32; training in 32-true instead",
        precision, " or ".join(NATIVE_BF16_FLAGS),
    )  # fmt: skip
