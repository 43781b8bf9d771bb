"""distillens/checkpoints.py: what is checked before Lightning or torch read a checkpoint, and what is left to them."""

from __future__ import annotations

import pytest

from distillens.checkpoints import check_checkpoint_file, load_checkpoint


def test_lightnings_own_checkpoint_names_folders_and_remote_files_are_left_to_it(tmp_path):
    for path in (None, "last", "best", "registry:model:latest", "s3://bucket/run.ckpt", tmp_path):
        check_checkpoint_file(path)  # a sharded (FSDP) checkpoint is a folder


def test_a_missing_or_empty_file_is_one_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.ckpt does not exist"):
        check_checkpoint_file(tmp_path / "missing.ckpt")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.ckpt: not a checkpoint torch can read .*\(an empty file\)"):
        load_checkpoint(empty)
