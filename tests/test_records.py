"""Generated answers as records (distillens.records): sharded over ranks with equal shares, merged back once each in
dataset order."""

from __future__ import annotations

import pytest
import torch

from distillens.records import (
    GenerationRecord,
    gather_records,
    merge_shards,
    records_from_batch,
    shard_loader,
)


def record(index: int, prediction: str = "", references=("ref",), prompt: str = "p") -> GenerationRecord:
    return GenerationRecord(index, prompt, tuple(references), prediction)


def test_merge_shards_drops_repeats_keeps_the_earliest_shard_and_sorts_by_index():
    # DistributedSampler over 5 examples and 2 ranks: rank 0 gets 0, 2, 4; rank 1 gets 1, 3 and a repeat of 0
    shards = [
        [record(0, "r0"), record(2, "r0"), record(4, "r0")],
        [record(1, "r1"), record(3, "r1"), record(0, "r1 repeat")],
    ]
    merged = merge_shards(shards)
    assert [r.index for r in merged] == [0, 1, 2, 3, 4]
    assert merged[0].prediction == "r0"


def test_gather_records_without_a_process_group_sorts_and_deduplicates():
    assert [r.index for r in gather_records([record(2), record(0), record(2)])] == [0, 2]


def test_records_from_batch_pairs_rows_with_predictions():
    batch = {"index": [4, 7], "prompts": ["a", "b"], "references": [["x"], ["y", "z"]]}
    records = records_from_batch(batch, ["pa", "pb"])
    assert records == [
        GenerationRecord(4, "a", ("x",), "pa"),
        GenerationRecord(7, "b", ("y", "z"), "pb"),
    ]
    with pytest.raises(ValueError, match="1 predictions for a batch of 2"):
        records_from_batch(batch, ["only one"])


def _index_loader(size: int, batch_size: int):
    rows = [{"index": i} for i in range(size)]
    return torch.utils.data.DataLoader(
        rows, batch_size=batch_size, collate_fn=lambda f: [r["index"] for r in f]
    )


@pytest.mark.parametrize(
    ("size", "world", "max_prompts", "expected"),
    [
        (7, 3, None, [[0, 3, 6], [1, 4, 0], [2, 5, 1]]),  # 9 slots: repeats of 0 and 1 pad the last ranks
        (7, 2, 4, [[0, 2], [1, 3]]),  # the first 4 prompts only
        (2, 3, None, [[0], [1], [0]]),  # fewer prompts than ranks: every rank still runs one batch
        (5, 1, 10, [[0, 1, 2, 3, 4]]),  # a subset larger than the set is the whole set
    ],
)
def test_shard_loader_gives_equal_shares_of_the_subset(size, world, max_prompts, expected):
    loader = _index_loader(size, batch_size=2)
    shares = [
        [i for batch in shard_loader(loader, rank, world, max_prompts) for i in batch]
        for rank in range(world)
    ]
    assert shares == expected


def test_shard_loader_rejects_a_non_positive_subset():
    with pytest.raises(ValueError, match="max_prompts=0"):
        shard_loader(_index_loader(3, 1), 0, 1, max_prompts=0)
