"""Sharded training with FSDP2 (``fully_shard``) through Lightning's ModelParallelStrategy.

Layout, for the student and the frozen teacher alike (README, "Scaling out"):

- every decoder block is its own FSDP unit, so one block's full weights are live at a time;
- the root unit holds the rest: embeddings, final norm and unembedding (a tied unembedding is the embedding, so the
  two must share a unit: FSDP2 refuses a parameter managed by two units).

The logit lens needs the full final norm and unembedding *outside* the model's own forward: ``sharding.gathered``
(plain torch, so that the objective loads no Lightning) all-gathers each root unit around the loss.
``offload_teacher`` keeps the teacher's shards in CPU memory between uses.

FSDP averages gradients over ranks like DDP, so the module's token-count normalisation (sum / (A * W) times
A * W / N) is unchanged. Checkpoints are distributed (a folder, one shard file per rank, teacher excluded); a full
student is gathered for export by ``export.consolidated_model``. To turn a checkpoint folder into one file:
``python -m lightning.fabric.utilities.consolidate_checkpoint FOLDER --output_file FILE.ckpt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
from transformers import PreTrainedModel

from distillens.structure import blocks_of


@dataclass
class ShardingOptions:
    """How the module shards its models when a strategy gives it a device mesh."""

    offload_teacher: bool = False
    """Keep the teacher's shards in CPU memory; each block is copied to the accelerator for its forward only."""
    reshard_after_forward: bool = True
    """Free the student's gathered blocks after their forward (ZeRO-3); False keeps them for the backward (less
    communication, more memory). The teacher's blocks are always freed: it has no backward."""


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: one data-parallel group of every process on every node.

    ModelParallelStrategy's default mesh puts the processes of a node on a tensor-parallel axis, which this project
    does not use; here the whole world is the data-parallel axis. Select it with ``configs/trainer/fsdp.yaml``.

    Args:
        offload_teacher: see ``ShardingOptions``.
        reshard_after_forward: see ``ShardingOptions``.
        save_distributed_checkpoint: True writes a folder of per-rank shards; False gathers one file on rank 0.
        process_group_backend: None picks nccl on CUDA, gloo on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        offload_teacher: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.sharding = ShardingOptions(offload_teacher, reshard_after_forward)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # the world, before the mesh is built
        super().setup_environment()


def sharding_options(strategy: Any) -> ShardingOptions:
    """The strategy's sharding options, or the defaults for a plain ModelParallelStrategy."""
    return getattr(strategy, "sharding", None) or ShardingOptions()


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D mesh FSDP shards over: Lightning's ("data_parallel", "tensor_parallel") mesh, tensor size 1."""
    if mesh.ndim == 1:
        return mesh
    tensor_parallel = mesh["tensor_parallel"].size()
    if tensor_parallel != 1:
        raise ValueError(
            f"ModelParallelStrategy tensor_parallel_size={tensor_parallel}: distillens shards with FSDP only; "
            "use distillens.distributed.FSDP2Strategy (configs/trainer/fsdp.yaml) or tensor_parallel_size=1"
        )
    return mesh["data_parallel"]


def shard_models(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    extra: nn.ModuleList,
    mesh: DeviceMesh,
    options: ShardingOptions,
) -> None:
    """Shard student and teacher per decoder block plus a root unit; ``extra`` modules (MSE projections) each whole."""
    mesh = data_parallel_mesh(mesh)
    shard_model(student, mesh, reshard_after_forward=options.reshard_after_forward)
    if teacher is not None:
        offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if options.offload_teacher else None
        shard_model(teacher, mesh, offload=offload)
    for module in extra:
        fully_shard(module, mesh=mesh)


def shard_model(
    model: PreTrainedModel,
    mesh: DeviceMesh,
    *,
    reshard_after_forward: bool = True,
    offload: OffloadPolicy | None = None,
) -> None:
    """``fully_shard`` each decoder block, then the model itself (the root: embeddings, final norm, head)."""
    policy = {"offload_policy": offload} if offload is not None else {}
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **policy)
    fully_shard(model, mesh=mesh, **policy)  # the root stays gathered after forward: its backward needs it
