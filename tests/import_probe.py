"""What importing each named distillens module loads of Lightning and PEFT, each import in a fresh process.

    python tests/import_probe.py objective onpolicy ...   ->   {"objective": [], "onpolicy": ["lightning"], ...}

Torch and transformers' model classes, which every such module needs and which load neither framework, are imported
once here; each module is then imported in a child forked from this process, so every import is fresh and none
pays for torch again. Run by tests/test_architecture.py.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import torch  # noqa: F401  (loaded once, before the forks)
import transformers.modeling_utils  # noqa: F401

FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "peft")


def frameworks_loaded() -> list[str]:
    return sorted({name.split(".")[0] for name in sys.modules if name.split(".")[0] in FRAMEWORKS})


def probe(module: str) -> list[str]:
    """Import ``distillens.<module>`` in a forked child; what of FRAMEWORKS that left in its ``sys.modules``."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        importlib.import_module(f"distillens.{module}")
        os.write(write, json.dumps(frameworks_loaded()).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        loaded = pipe.read()
    _, status = os.waitpid(child, 0)
    if status != 0:
        raise RuntimeError(f"import distillens.{module} failed in the child (status {status})")
    return json.loads(loaded)


if __name__ == "__main__":
    if frameworks_loaded():
        raise RuntimeError(
            f"torch or transformers loaded {frameworks_loaded()}: the probe would blame the modules"
        )
    print(json.dumps({module: probe(module) for module in sys.argv[1:]}))
