"""The host allocator setting: after keep_freed_memory, glibc serves large blocks from its heap and keeps them
when freed, where it used to map and unmap each one (read from glibc's own accounting, mallinfo2)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from helpers import subprocess_env

from distillens import allocator

PROBE = """
import ctypes, json, sys
import torch
from distillens.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def block_of_64_mib():
    block = torch.ones(16 * 2**20)  # 64 MiB, above glibc's largest mmap threshold
    mapped = libc.mallinfo2().hblkhd  # bytes in mmap-served blocks while it lives
    del block
    return mapped, libc.mallinfo2().fordblks  # and the free bytes the heap keeps once it is gone

before = block_of_64_mib()
kept = keep_freed_memory()
after = block_of_64_mib()
print(json.dumps({"kept": kept, "before": before, "after": after}))
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)
def test_large_blocks_come_from_the_heap_and_stay_there_once_freed():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=subprocess_env()
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 2**20
    assert result["kept"] is True
    assert result["before"][0] >= 64 * mib  # glibc's default: the block was mapped for itself ...
    assert result["before"][1] < 64 * mib  # ... and given back when freed
    assert result["after"][0] < 64 * mib  # now it comes from the heap ...
    assert result["after"][1] >= 64 * mib  # ... which keeps it for the next step


def test_elsewhere_nothing_changes(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False
