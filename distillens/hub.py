"""What loading data and models from the Hugging Face hub, and caching what they build, have in common.

Kept apart from `data` and `models` (and importing nothing from distillens) so that both tell hub ids from local
paths by one rule, read offline mode from the same variables, probe the hub the same quick way before a download
(no network: one line in seconds, not a minute of retries), and publish a built folder the same safe way.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
"""A hub id: "gpt2" or "org/name"; anything else is a local path."""

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables asking for offline mode (any one set: use the local cache only)."""
HUB_PROBE_TIMEOUT_S = 3.0
"""How long the probe waits for the hub: a machine without network fails in seconds, not after the libraries'
retries (35-60 s of messages)."""


def is_hub_id(value: str) -> bool:
    """Whether the whole string has the form of a hub id (it may still name no repository)."""
    return HUB_ID.fullmatch(value) is not None


def offline_requested() -> bool:
    """Whether the user asked for offline mode, read now (the libraries read these variables once, at import)."""
    flags = (os.environ.get(name, "") for name in OFFLINE_VARIABLES)
    return any(flag.upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A quick HEAD on the hub endpoint: whether anything there answers within ``timeout_s``.

    Run in a thread and waited for at most ``timeout_s`` (plus a second): the socket's timeout does not bound
    the name lookup, which a machine whose DNS server does not answer may spend much longer on.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    answers: list[bool] = []
    probe = threading.Thread(target=lambda: answers.append(_answers(endpoint, timeout_s)), daemon=True)
    probe.start()
    probe.join(timeout_s + 1)
    return bool(answers and answers[0])


def _answers(endpoint: str, timeout_s: float) -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError):
        return False
    return True


def check_hub_reachable(hub_id: str, field: str) -> None:
    """The rule data and models share: a hub id is fetched from the hub, so without offline mode the hub must
    answer the probe; otherwise one line naming the setting (``field``) says what to do instead."""
    if offline_requested() or hub_reachable():
        return
    raise OSError(
        f"{field}: {hub_id!r} is not a local folder and the Hugging Face hub is unreachable (no network?); "
        f"download it elsewhere and point {field} at the folder, or set HF_HUB_OFFLINE=1 to use the local cache"
    )


def build_once(folder: Path, build: Callable[[Path], None]) -> None:
    """Run `build` into a private staging folder, then rename it to `folder` in one atomic step.

    Several processes (DDP ranks) may build at once: each writes its own staging folder, the first rename
    wins, the others find `folder` complete and drop their copy. Nobody ever sees a half-written folder, and an
    interrupted build leaves no staging folder behind.
    """

    def publish(staging: Path) -> None:
        try:
            os.rename(staging, folder)  # atomic; replaces `folder` only if it is an empty directory
        except OSError:
            if not (folder.is_dir() and any(folder.iterdir())):
                raise
            log.info("%s was built by another process meanwhile; keeping that one", folder)

    _staged(folder, build, publish)


def replace_folder(folder: Path, build: Callable[[Path], None]) -> None:
    """Run `build` into a staging folder beside `folder`, then swap the two and delete the old one: no file of
    the old folder is left mixed in with the new, and an interrupted build leaves the old folder whole."""

    def publish(staging: Path) -> None:
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
        os.rename(staging, folder)
        shutil.rmtree(old, ignore_errors=True)

    _staged(folder, build, publish)


def _staged(folder: Path, build: Callable[[Path], None], publish: Callable[[Path], None]) -> None:
    """Build into a private staging folder next to `folder` and publish it; the staging folder never stays."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp's folder is private (0700); the published one is an ordinary folder
        publish(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
