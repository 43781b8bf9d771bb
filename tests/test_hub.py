"""What loading from the hub has in common (distillens.hub): one complete folder published by concurrent builders,
and a reachability probe that gives up in seconds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from distillens.hub import build_once, hub_reachable


def test_concurrent_builds_publish_one_complete_folder(tmp_path):
    """Two builders (think DDP ranks) both finish staging before either publishes: one wins, none fails."""
    folder, both_staged = tmp_path / "models" / "teacher", threading.Barrier(2)
    errors = []

    def build(staging: Path, writer: int) -> None:
        (staging / "weights").write_text(f"from writer {writer}")
        both_staged.wait(timeout=10)

    def run(writer: int) -> None:
        try:
            build_once(folder, lambda staging: build(staging, writer))
        except Exception as error:  # collected, so the test fails in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(writer,)) for writer in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (folder / "weights").read_text() in {"from writer 1", "from writer 2"}
    assert sorted(p.name for p in folder.parent.iterdir()) == ["teacher"]  # staging folders cleaned up
    assert folder.stat().st_mode & 0o777 == 0o755


def test_the_hub_probe_gives_up_quickly_on_an_endpoint_that_does_not_answer(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert hub_reachable(timeout_s=1.0) is False


def test_the_hub_probe_gives_up_on_a_name_lookup_that_hangs(monkeypatch):
    """The socket timeout does not bound DNS: the probe waits for its thread at most a second longer."""
    monkeypatch.setattr("distillens.hub._answers", lambda endpoint, timeout_s: time.sleep(30) or True)
    # a probe that waited for the lookup would get its True after 30 s: False means it gave up first
    assert hub_reachable(timeout_s=0.5) is False
