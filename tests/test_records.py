"""Generated answers as records (distillens.records): sharded over ranks with equal shares, merged back once each in
dataset order, on one process and on a real 2-process gloo group."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from distillens.data import GenerationCollator, IndexedRows
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


def _rank_gathers(rank: int, world_size: int, port: int, size: int, out: str) -> None:
    """One rank: generate (fake answers naming the rank) on its shard of the real collated loader, then gather."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=30))
    try:
        rows = [
            {
                "input_ids": [5, 6, 7][: 1 + i % 3],
                "prompt_length": 1 + i % 3,
                "prompt": f"q{i}",
                "references": [f"a{i}"],
            }
            for i in range(size)
        ]
        loader = torch.utils.data.DataLoader(
            IndexedRows(rows), batch_size=2, collate_fn=GenerationCollator(0, "set")
        )
        records = []
        for batch in shard_loader(loader, rank, world_size):
            records += records_from_batch(batch, [f"{p} by rank {rank}" for p in batch["prompts"]])
        gathered = gather_records(records)
        Path(out, f"rank{rank}.json").write_text(json.dumps([dataclasses.asdict(r) for r in gathered]))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_gather_returns_each_example_once_in_order_on_every_rank(tmp_path):
    size, world_size = 5, 2  # DistributedSampler pads rank 1 with a repeat of example 0
    mp.spawn(_rank_gathers, args=(world_size, free_port(), size, str(tmp_path)), nprocs=world_size, join=True)
    expected = [
        {
            "index": i,
            "prompt": f"q{i}",
            "references": [f"a{i}"],
            "prediction": f"q{i} by rank {i % 2}",
            "new_tokens": None,
            "ended": None,
        }
        for i in range(size)
    ]
    for rank in range(world_size):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected
