"""Reading checkpoint files: a file that is not a complete checkpoint is one error naming the file.

torch reports a checkpoint cut short (a full disk, an interrupted copy) as "PytorchStreamReader failed reading zip
archive: failed finding central directory", an empty one as a bare EOFError, and neither names the file; fit
(Lightning's ``ckpt_path``), ``export`` and ``diagnose`` all read checkpoints through here instead.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

UNREADABLE = (KeyError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile)
"""What reading a file that is not a checkpoint raises (a text file: KeyError; a cut one: RuntimeError, EOFError;
an unreadable one: OSError such as [Errno 22] Invalid argument)."""
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
"""Values of Lightning's ``ckpt_path`` that name no file: Lightning resolves them itself."""


def check_checkpoint_file(path: str | Path | None) -> None:
    """Fail in a second, naming the file, when ``path`` cannot be a complete checkpoint.

    A checkpoint is a zip archive whose directory is written last, so a file cut short has none: opening the
    archive finds that without reading (or unpickling) the weights. ``None`` and Lightning's names ("last",
    "best", ...) are left to Lightning.
    """
    if path is None or str(path) in LIGHTNING_CKPT_NAMES or str(path).startswith("registry:"):
        return
    file = Path(path)
    if "://" in str(path) or file.is_dir():  # remote (fsspec) files, sharded checkpoints: Lightning's to read
        return
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist")
    try:
        with zipfile.ZipFile(file) as archive:
            entries = archive.infolist()
    except UNREADABLE as error:
        raise _unreadable(file, error) from error
    size = file.stat().st_size
    if not any(entry.filename.endswith("data.pkl") for entry in entries) or any(
        entry.header_offset + entry.compress_size > size for entry in entries
    ):
        raise ValueError(f"{file}: not a complete checkpoint (a zip archive without torch's data.pkl)")


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's contents on the CPU, read with ``weights_only=True`` (tensors and plain values only);
    ``mmap`` maps the tensors instead of reading them, for callers that want the settings only."""
    check_checkpoint_file(path)
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True, mmap=mmap)
    except UNREADABLE as error:
        raise _unreadable(Path(path), error) from error


def _unreadable(path: Path, error: BaseException) -> ValueError:
    reason = (str(error).strip().splitlines() or [""])[0]
    hint = ""
    if path.is_file():
        cut = "; it may have been cut short (a full disk, an interrupted copy)"
        hint = cut if path.stat().st_size else " (an empty file)"
    return ValueError(f"{path}: not a checkpoint torch can read ({type(error).__name__}: {reason}){hint}")
