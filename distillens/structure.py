"""Where a decoder-only causal LM keeps its parts: decoder, decoder blocks, final norm and unembedding.

Found from transformers' own module structure (`get_decoder`, `get_output_embeddings`, the configured depth) rather
than from a table of families. The logit lens, layer-subset students and per-block sharding all ask here, so they
agree on which modules are the blocks. Imports nothing from distillens.
"""

from __future__ import annotations

from torch import nn

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm")
"""Attribute names a decoder gives its final norm, preferred in this order over any other norm child."""


def decoder_of(model: nn.Module) -> nn.Module:
    """The model's decoder (the module holding embeddings, blocks and final norm), as `get_decoder()` names it."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise ValueError(
            f"{type(model).__name__} is not a decoder-only causal LM: get_decoder() found no decoder"
        )
    return decoder


def blocks_of(model: nn.Module, decoder: nn.Module | None = None) -> nn.ModuleList:
    """The decoder's ModuleList of blocks: the direct child whose length is the configured depth."""
    decoder = decoder_of(model) if decoder is None else decoder
    depth = getattr(model.config, "num_hidden_layers", None)
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) == depth:
            return child
    raise ValueError(
        f"{type(model).__name__}: no list of {depth} decoder blocks among the children of {type(decoder).__name__}"
    )


def block_list_name(model: nn.Module) -> str:
    """Dotted name of the block list inside the model (`model.layers`, `transformer.h`, ...), as its state dict
    keys spell it, for copying or dropping blocks by name."""
    blocks = blocks_of(model)
    return next(name for name, module in model.named_modules() if module is blocks)


def final_norm_of(decoder: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The decoder's own norm applied after the last block (None for families without one, e.g. post-LN OPT)."""
    norms = {
        name: child
        for name, child in decoder.named_children()
        if child is not blocks and "norm" in type(child).__name__.lower()
    }
    for name in FINAL_NORM_NAMES:
        if name in norms:
            return norms[name]
    if len(norms) == 1:
        return next(iter(norms.values()))
    if any(name in FINAL_NORM_NAMES for name, _ in decoder.named_children()):
        return None  # the attribute exists but is None: the family applies no final norm
    raise ValueError(
        f"{type(decoder).__name__}: cannot tell the final norm among {sorted(norms) or 'no children'}"
    )


def unembedding_of(model: nn.Module) -> nn.Module:
    """The output embeddings: hidden state -> logits."""
    unembedding = model.get_output_embeddings()
    if unembedding is None:
        raise ValueError(
            f"{type(model).__name__}: no output embeddings (get_output_embeddings() returned None)"
        )
    return unembedding
