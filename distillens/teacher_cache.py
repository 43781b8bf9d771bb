"""Teacher targets computed once: a cache of what the objective reads of the frozen teacher, built before training.

Every training step of a live run runs the teacher again on the same examples, in every epoch, for every method and
seed of a study. With ``model.teacher_targets.kind`` set to a cached kind, one pass of the teacher over the training
and validation splits stores, for every supervised position, what the objective needs of it:

- ``hidden`` (exact): the teacher's hidden states at the paired layers and its last one. Training applies the
  teacher's final norm and unembedding to them, so the loss and every gradient are the live run's; the teacher's
  blocks are freed before the first step.
- ``topk`` (approximate, for large teachers): at the final layer and at each paired lens layer, the k largest
  log-probabilities, their token ids and the log of the remaining mass (``distillens/topk.py``). The teacher is not
  needed at all once the cache exists.

A cache folder is named after a hash of everything that changes its contents (the teacher's settings and files, the
tokenised splits, the layer pairs, the precision, the kind, k, temperature and lens norm), so a changed setting
reads another folder and never a stale one. It holds ``key.json`` (written first), safetensors shards of
``shard_rows`` examples (each written to a temporary name and renamed, memory-mapped when read) and ``manifest.json``
(written last, after every shard): a build killed part-way leaves no manifest, is never read, and resumes at the
first missing shard. Under DDP and FSDP each rank builds every world-size-th shard and rank 0 writes the manifest;
an FSDP-sharded teacher keeps its shards (they are FSDP's to free), so there the cache saves its compute, not its
memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from distillens.data.collate import EXAMPLE_INDEX, IndexedRows, TrainingCollator
from distillens.lens import LogitLens
from distillens.losses import IGNORE_INDEX
from distillens.sharding import gathered, is_sharded
from distillens.topk import TopK, top_k_of

log = logging.getLogger(__name__)

KINDS = ("live", "hidden", "topk")
CACHE_VERSION = 1  # bump when the layout of a cache folder changes
SPLITS = ("train", "validation")
TEACHER_TARGETS = "teacher_targets"
"""Batch key of a micro-batch's cached teacher targets (``CachedTargets``), attached by the module."""


@dataclass
class TeacherTargets:
    """Where training reads the teacher from: the live teacher, or targets computed once and cached."""

    kind: str = "live"
    """live: the teacher runs in every step. hidden: its hidden states at the paired layers and the last one are
    computed once and cached (exact; per supervised token (pairs + 1) x hidden size x 2 or 4 bytes, e.g. 13.8 kB
    for the default: bf16-mixed keeps the residual stream in fp32); only its final norm and unembedding stay in
    memory (unless keep_teacher). topk: the top k log-probabilities
    and ids at the final layer and each paired layer (approximate; (pairs + 1) x (8 k + 4) bytes per supervised
    token); the teacher is not kept. Cached kinds apply to fit (its training and validation steps); validate and
    test run the live teacher. They do not combine with on-policy training (its answers are new sequences)."""
    k: int = 64
    """topk only: how many of the teacher's most likely tokens each position keeps."""
    cache_dir: str | None = None
    """Folder of teacher caches; null: teacher/ in data.cache_dir."""
    shard_rows: int = 128
    """Examples per shard file (each rank of a build writes every world-size-th shard)."""
    build_only: bool = False
    """Build the cache and stop before the first step, exporting nothing (what `distillens teach` sets)."""
    keep_teacher: bool = False
    """Keep the teacher's weights after the build: the steps still read the cache (its compute is saved, not its
    memory), and callbacks that run the whole teacher (LensDiagnostics, every depth) still can."""

    @property
    def cached(self) -> bool:
        return self.kind != "live"

    def resolved(self, reads_teacher: bool, on_policy: bool, mse: bool) -> TeacherTargets:
        """These targets, or live ones when no trained term reads the teacher (kd, lens and mse weights 0: an SFT
        run, or the test of an exported student, on a config that caches): nothing to cache. One line for a choice
        that cannot work."""
        if self.kind not in KINDS:
            raise ValueError(f"model.teacher_targets.kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.cached or not reads_teacher:
            return replace(self, kind="live")
        if self.k < 1:
            raise ValueError(f"model.teacher_targets.k={self.k}: must be >= 1")
        if on_policy:
            raise ValueError(
                f"model.teacher_targets.kind={self.kind} does not combine with on-policy training: the student's "
                "and the teacher's answers are new sequences the cache cannot hold; use kind live"
            )
        if mse and self.kind == "topk":
            raise ValueError(
                "model.teacher_targets.kind=topk holds no hidden states, which the MSE baseline needs "
                "(model.loss.mse_weight > 0): use kind hidden"
            )
        return self


@dataclass
class CachedTargets:
    """One micro-batch's teacher targets read from a cache, in place of the teacher's forward."""

    hidden: dict[int, Tensor] = field(default_factory=dict)
    """hidden: teacher hidden-state index -> (B, T-1, d_t), aligned with the batch's shifted mask (0 elsewhere)."""
    topk: dict[str | int, TopK] = field(default_factory=dict)
    """topk: "final" (the output) or a lens layer's index -> the top-k targets at the supervised positions, in
    row-major order."""


# ----------------------------------------------------------------------------------------------------------------
# The key and the folder


def files_fingerprint(path: str | os.PathLike | None) -> list[tuple[str, int, int]] | None:
    """Names, sizes and modification times of the files under a local path (None when it is not one): a changed
    weight file changes the cache key without reading gigabytes."""
    if path is None or not Path(path).exists():
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [
        (str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
    ]


@dataclass(frozen=True)
class CacheLocation:
    """A cache's folder, ``<root>/<kind>-<hash of its key>``, and the key (written beside the shards)."""

    folder: Path
    key: dict[str, Any]


def locate(targets: TeacherTargets, key: dict[str, Any], default_root: Path) -> CacheLocation:
    """Where the cache of these targets lives: a changed setting is another folder, never a stale read."""
    root = Path(targets.cache_dir) if targets.cache_dir else default_root
    keyed = _keyed(targets, key)
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()
    return CacheLocation(root / f"{targets.kind}-{digest[:20]}", keyed)


def _keyed(targets: TeacherTargets, key: dict[str, Any]) -> dict[str, Any]:
    keyed = {"version": CACHE_VERSION, "kind": targets.kind, "shard_rows": targets.shard_rows, **key}
    if targets.kind == "topk":
        keyed["k"] = targets.k
    else:  # hidden states do not depend on how the objective projects them
        keyed.pop("temperature", None)
        keyed.pop("lens_final_norm", None)
    return keyed


def is_complete(folder: Path) -> bool:
    """Whether a build finished here: its manifest is written last."""
    return (folder / "manifest.json").is_file()


def shard_path(folder: Path, split: str, shard: int) -> Path:
    return folder / f"{split}-{shard:05d}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Building


@dataclass
class TeacherView:
    """What a build reads of the teacher: the model, its lens and output head, and the layers the objective pairs."""

    model: nn.Module
    lens: LogitLens
    head: LogitLens
    layers: list[int]
    """Teacher hidden-state indices of the lens pairs (may be empty)."""
    depth: int

    @classmethod
    def of(cls, objective: Any) -> TeacherView:
        """The teacher an ``objective.Objective`` reads, with its lenses and every configured layer pair (also
        when this objective has no lens term: the methods of a study share one cache)."""
        lens, layers = objective.teacher_lens, objective.configured_pairs()[1]
        return cls(objective.teacher, lens, objective.teacher_head, list(layers), lens.num_layers)

    @property
    def captured(self) -> list[int]:
        return sorted({*self.layers, self.depth})


def build(
    folder: Path,
    targets: TeacherTargets,
    view: TeacherView,
    splits: dict[str, Any],
    collator: TrainingCollator,
    batch_size: int,
    *,
    device: torch.device,
    forward_context: Callable[[], Any],
    temperature: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    most_over_ranks: Callable[[int], int] = lambda count: count,
    key: dict[str, Any] | None = None,
) -> None:
    """Run the teacher over ``splits`` (name -> tokenised rows) once and write the cache into ``folder``.

    Every rank builds the shards ``rank, rank + world_size, ...`` of each split, skipping shards already written by
    an interrupted build of the same key; then rank 0 writes the manifest. All ranks must call it. A sharded (FSDP)
    teacher's forward is a collective, so there every rank runs as many forwards as the busiest one
    (``most_over_ranks``: the maximum of a count over ranks), the spare ones on a row already done, discarded.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (folder / "key.json").is_file():
        _write_atomically(folder / "key.json", json.dumps(key or {}, default=str, indent=1))
    start = time.perf_counter()
    work = _missing_shards(folder, splits, targets.shard_rows, rank, world_size)
    forwards = sum(-(-len(indices) // batch_size) for _, _, indices in work)
    spare = most_over_ranks(forwards) - forwards if is_sharded(view.model) else 0
    run = dict(view=view, device=device, forward_context=forward_context, temperature=temperature)
    for split, shard, indices in _progress(work, "teacher cache", rank):
        tensors = _shard_tensors(targets, splits[split], indices, collator, batch_size, **run)
        _save_atomically(tensors, shard_path(folder, split, shard))
    first = next(iter(splits.values()))
    for _ in range(spare):  # keep step with the ranks that still have shards to build
        _shard_tensors(targets, first, range(1), collator, batch_size, **run)
    barrier()
    if rank == 0:
        manifest = _manifest(folder, splits, targets, time.perf_counter() - start)
        _write_atomically(folder / "manifest.json", json.dumps(manifest, indent=1))
        print(describe(manifest, folder), flush=True)
    barrier()


def _missing_shards(
    folder: Path, splits: dict[str, Any], size: int, rank: int, world_size: int
) -> list[tuple[str, int, range]]:
    """(split, shard, example indices) of this rank's shards not yet on disk (an interrupted build wrote the rest)."""
    work = []
    for split, rows in splits.items():
        for shard in range(rank, -(-len(rows) // size), world_size):
            if not shard_path(folder, split, shard).is_file():
                work.append((split, shard, range(shard * size, min((shard + 1) * size, len(rows)))))
    return work


def _shard_tensors(
    targets, rows, indices, collator, batch_size, *, view, device, forward_context, temperature
):
    """Every tensor of one shard: ``<example index>.<name>`` -> that example's supervised positions' targets."""
    tensors: dict[str, Tensor] = {}
    dataset = IndexedRows(rows)
    for begin in range(0, len(indices), batch_size):
        batch = collator([dataset[i] for i in indices[begin : begin + batch_size]])
        for index, named in _batch_targets(targets, view, batch, device, forward_context, temperature):
            tensors |= {f"{index}.{name}": value.contiguous().cpu() for name, value in named.items()}
    return tensors


def _batch_targets(targets, view, batch, device, forward_context, temperature) -> Iterator[tuple[int, dict]]:
    """(example index, {name: tensor}) for each row of one collated batch."""
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    mask = batch["labels"][:, 1:].to(device) != IGNORE_INDEX  # (B, T-1)
    with torch.no_grad(), forward_context(), view.lens.capture(view.captured) as hidden:
        view.model(**inputs, use_cache=False, logits_to_keep=1)
    hidden = {j: h[:, :-1] for j, h in hidden.items()}  # (B, T-1, d_t): position t predicts token t+1
    rows = [(index, {j: h[row][mask[row]] for j, h in hidden.items()})  # (n, d_t) each
            for row, index in enumerate(batch[EXAMPLE_INDEX].tolist())]  # fmt: skip
    if targets.kind == "hidden":
        yield from ((index, {f"h{j}": value for j, value in kept.items()}) for index, kept in rows)
        return
    # the full final norm and unembedding (a sharded teacher's root gathered, on every rank alike)
    with torch.no_grad(), forward_context(), gathered(view.model):
        for index, kept in rows:
            named = {"final": top_k_of(view.head.logits(kept[view.depth]), targets.k, temperature)}
            named |= {
                f"lens{j}": top_k_of(view.lens.logits(kept[j]), targets.k, temperature) for j in view.layers
            }
            yield index, {f"{name}.{part}": getattr(top, part) if part != "ids" else top.ids.int()
                          for name, top in named.items() for part in ("logprobs", "ids", "tail")}  # fmt: skip


def _manifest(
    folder: Path, splits: dict[str, Any], targets: TeacherTargets, seconds: float
) -> dict[str, Any]:
    """What the build wrote: rows, supervised tokens and bytes of each split (read back from the shards)."""
    manifest: dict[str, Any] = {
        "kind": targets.kind,
        "k": targets.k,
        "shard_rows": targets.shard_rows,
        "seconds": round(seconds, 1),
        "splits": {},
    }
    for split, rows in splits.items():
        paths = [shard_path(folder, split, s) for s in range(-(-len(rows) // targets.shard_rows))]
        tokens = 0
        for path in paths:
            with safe_open(str(path), framework="pt") as shard:
                names = list(shard.keys())
                first = sorted({name.split(".", 1)[1] for name in names})[0]
                tokens += sum(shard.get_slice(n).get_shape()[0] for n in names if n.endswith("." + first))
        manifest["splits"][split] = {
            "rows": len(rows), "shards": len(paths), "tokens": tokens, "bytes": sum(p.stat().st_size for p in paths),
        }  # fmt: skip
    return manifest


def describe(manifest: dict[str, Any], folder: Path) -> str:
    """One line: the cache's size per supervised token and in total, and how long it took."""
    tokens = sum(split["tokens"] for split in manifest["splits"].values())
    size = sum(split["bytes"] for split in manifest["splits"].values())
    return (
        f"teacher cache ({manifest['kind']}{', k=' + str(manifest['k']) if manifest['kind'] == 'topk' else ''}): "
        f"{tokens} supervised tokens, {size / max(tokens, 1) / 1e3:.2f} kB per token, {size / 1e6:.1f} MB in all, "
        f"built in {manifest['seconds']:.0f} s: {folder}"
    )


def _progress(items: list, description: str, rank: int) -> Iterable:
    """A progress bar on rank 0 (the build can take as long as an epoch)."""
    if rank != 0 or len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="shard", leave=False)


def _save_atomically(tensors: dict[str, Tensor], path: Path) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial))
    os.replace(partial, path)


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def prepare(location: CacheLocation, targets: TeacherTargets, view: TeacherView, module: Any) -> TeacherCache:
    """A fit's cache, built first when it is missing (every rank its share), once the teacher is on its device;
    then the teacher's blocks (hidden) or the whole teacher (topk) are freed. ``module``: the LightningModule."""
    trainer, data = module.trainer, module.trainer.datamodule
    if not is_complete(location.folder):
        if is_stripped(view.model):
            raise RuntimeError(
                f"{location.folder}: the teacher cache is incomplete and the teacher was not built"
            )
        build(
            location.folder, targets, view, {name: data.splits[name] for name in SPLITS if name in data.splits},
            TrainingCollator(data.pad_token_id, data.pad_to_multiple_of), data.batch_size,
            device=module.device, forward_context=trainer.precision_plugin.forward_context,
            temperature=module.loss_config.temperature, rank=trainer.global_rank, world_size=trainer.world_size,
            barrier=trainer.strategy.barrier, key=location.key,
            most_over_ranks=lambda count: _most_over_ranks(trainer.strategy, count, module.device),
        )  # fmt: skip
    keep = is_sharded(view.model) or targets.keep_teacher  # FSDP's units own a sharded teacher's shards
    if not keep:
        strip_blocks(view.lens.blocks if targets.kind == "hidden" else [view.model])
    if targets.build_only:
        trainer.should_stop = True  # the fit loop ends before its first step
    return TeacherCache(location.folder, targets.kind, module.objective.teacher_layers, view.depth)


def _most_over_ranks(strategy: Any, count: int, device: torch.device) -> int:
    """The largest ``count`` of any rank (a collective: every rank calls it)."""
    return int(strategy.reduce(torch.tensor(count, device=device), reduce_op="max"))


# ----------------------------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """A complete cache, read row by row (memory-mapped shards) into each micro-batch's ``CachedTargets``."""

    def __init__(self, folder: Path, kind: str, view_layers: list[int], depth: int) -> None:
        """``view_layers``: the paired teacher layers this objective reads (a subset of those cached)."""
        if not is_complete(folder):
            raise FileNotFoundError(f"{folder}: the teacher cache is not complete (no manifest.json)")
        self.folder, self.kind, self.layers, self.depth = folder, kind, view_layers, depth
        self.manifest = json.loads((folder / "manifest.json").read_text())
        self._shards: dict[Path, Any] = {}

    def _tensor(self, split: str, index: int, name: str) -> Tensor:
        path = shard_path(self.folder, split, index // self.manifest["shard_rows"])
        if path not in self._shards:
            self._shards[path] = safe_open(str(path), framework="pt")
        return self._shards[path].get_tensor(f"{index}.{name}")

    def targets(self, batch: dict[str, Tensor], split: str) -> CachedTargets:
        """The cached targets of a collated micro-batch (it must carry ``EXAMPLE_INDEX``), on its device."""
        labels = batch["labels"]  # (B, T)
        mask = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
        indices = batch[EXAMPLE_INDEX].tolist()

        def rows(name: str) -> Tensor:
            value = torch.cat([self._tensor(split, i, name) for i in indices])  # (N, ...)
            if value.shape[0] != int(mask.sum()):
                raise ValueError(
                    f"{self.folder}: {split} rows {indices} hold {value.shape[0]} cached positions but the batch "
                    f"supervises {int(mask.sum())}: the cache does not match these data; delete it to rebuild"
                )
            return value.to(labels.device, non_blocking=True)

        if self.kind == "hidden":
            hidden = {}
            for j in sorted({*self.layers, self.depth}):
                value = rows(f"h{j}")  # (N, d_t)
                hidden[j] = value.new_zeros((*mask.shape, value.shape[-1]))  # (B, T-1, d_t)
                hidden[j][mask] = value
            return CachedTargets(hidden=hidden)
        names = {"final": "final", **{j: f"lens{j}" for j in self.layers}}  # key -> name in the shards
        return CachedTargets(topk={
            key: TopK(rows(f"{name}.logprobs"), rows(f"{name}.ids").long(), rows(f"{name}.tail"))
            for key, name in names.items()
        })  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Freeing the teacher


def strip_blocks(blocks: Iterable[nn.Module]) -> None:
    """Free the weights of a teacher's ``blocks`` (moved to the meta device): the teacher keeps its structure (depth,
    lens), its embeddings, final norm and unembedding, and can no longer run a forward."""
    for block in blocks:
        block.to("meta")


def is_stripped(model: nn.Module | None) -> bool:
    """Whether some of a model's weights were freed (``strip_blocks``) or never built (a skeleton)."""
    return model is not None and any(param.is_meta for param in model.parameters())
