"""What the objective, the module and the export need to know of a model sharded by FSDP2 (``fully_shard``), in
plain torch: whether it is sharded, its root's full parameters around the loss, its full state.

The logit lens needs the full final norm and unembedding *outside* the model's own forward. ``gathered(...)``
wraps the loss: FSDP's public ``unshard()`` all-gathers each root unit and registers its parameters on their modules
as plain tensors. The chunked lens then differentiates through ordinary parameters; its gradients land on those
unsharded parameters next to the embedding's own, and FSDP's end-of-backward callback reduce-scatters them all,
exactly as if the head had run inside the forward. The teacher never sees a backward, so its root is resharded as
soon as the loss is computed.

Sharding itself, through Lightning's strategy, is ``distributed.py``; this module imports neither Lightning nor PEFT,
so that importing the objective loads neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``fully_shard`` was applied to the model (its parameters are DTensor shards outside forward)."""
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(*models: nn.Module | None) -> Iterator[None]:
    """Full parameters of each sharded model's root unit (final norm, unembedding) for the span of the block.

    On exit a root that no backward will use (frozen, or under ``no_grad``) is resharded to free its memory; a
    trained root stays gathered until FSDP's backward has reduce-scattered its gradients and resharded it.
    Unsharded models pass through untouched.
    """
    roots = [model for model in models if is_sharded(model)]
    for root in roots:
        root.unshard()
    try:
        yield
    finally:
        for root in roots:
            if not (torch.is_grad_enabled() and any(p.requires_grad for p in root.parameters())):
                root.reshard()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) state on CPU, on rank 0; an empty dict elsewhere. A collective: every rank calls."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
