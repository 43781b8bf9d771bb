"""distillens/checkpoints.py: what is checked before Lightning or torch read a checkpoint, and what is left to them."""

from __future__ import annotations

import pytest

from distillens.checkpoints import check_checkpoint_file, load_checkpoint


def test_lightnings_own_checkpoint_names_folders_and_remote_files_are_left_to_it(tmp_path, monkeypatch):
    """None of these exists as a file in the working folder, yet each is left to Lightning; a local path spelled
    like them that does not exist is refused."""
    monkeypatch.chdir(tmp_path)
    for path in (None, "last", "best", "registry:model:latest", "s3://bucket/run.ckpt", tmp_path):
        assert check_checkpoint_file(path) is None  # a sharded (FSDP) checkpoint is a folder
    for path in ("last.ckpt", "s3/bucket/run.ckpt", tmp_path / "best"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            check_checkpoint_file(path)


def test_a_missing_or_empty_file_is_one_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.ckpt does not exist"):
        check_checkpoint_file(tmp_path / "missing.ckpt")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.ckpt: not a checkpoint torch can read .*\(an empty file\)"):
        load_checkpoint(empty)
