"""Mixture-of-experts MLP layers in an open_clip model (CLIP-MoE, paper 46) and how a saved one is rebuilt.

``MoeMlp`` routes each token to its ``top_k`` experts (copies of a block's MLP). An upcycled model is an open_clip
``CLIP`` whose residual blocks' ``mlp`` are ``MoeMlp`` layers; its folder is an open_clip folder whose
``open_clip_config.json`` has one more key, ``"cliplab_moe": {"experts": E, "top_k": k}`` (``moe_spec``), which
``load_model`` reads: it builds the dense architecture, replaces the MLPs with ``add_moe_layers`` and loads the
weights strictly. open_clip alone cannot load such a folder (the MoE weights do not fit its architecture).
How the experts are made and trained is ``train/objectives_moe.py`` and ``train/moe_upcycle.py``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CliplabError

MOE_KEY = "cliplab_moe"  # the open_clip_config.json key of an upcycled model


class MoeMlp(torch.nn.Module):
    """Top-k routed experts over the last dimension; ``aux_loss`` holds the latest load-balancing loss.

    The router is a bias-free linear layer initialised at zero (all experts equally likely); the softmax weights
    of the chosen experts are renormalised over them. ``aux_loss`` is the Switch/GShard ``E * sum_e f_e P_e``.
    """

    def __init__(self, experts: Sequence[torch.nn.Module], width: int, top_k: int = 2):
        super().__init__()
        if not experts:
            raise CliplabError("clip-moe: a MoE layer needs at least one expert")
        self.experts = torch.nn.ModuleList(experts)
        self.router = torch.nn.Linear(width, len(experts), bias=False)
        torch.nn.init.zeros_(self.router.weight)
        self.top_k = max(1, min(int(top_k), len(experts)))
        self.aux_loss = torch.zeros(())

    @property
    def c_fc(self) -> torch.nn.Module:
        """The first expert's input layer (open_clip reads the blocks' weight dtype from ``mlp.c_fc``)."""
        return self.experts[0].c_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.router(flat).float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, (weights[rows, slot].unsqueeze(-1) * expert(flat[rows]).float()).to(out.dtype))
        n_experts = len(self.experts)
        fraction = torch.bincount(chosen[:, 0], minlength=n_experts).float() / len(flat)
        self.aux_loss = n_experts * (fraction * probs.mean(0)).sum()
        return out.reshape(x.shape)


def moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The residual blocks with an ``mlp`` of both towers (image tower first; a ResNet image tower has none)."""
    blocks = []
    for tower in (getattr(getattr(model, "visual", None), "transformer", None), getattr(model, "transformer", None)):
        if tower is not None and hasattr(tower, "resblocks"):
            blocks.extend(tower.resblocks)
    if not blocks:
        raise CliplabError("clip-moe: the model has no transformer blocks with an MLP to upcycle")
    return blocks


def add_moe_layers(model: torch.nn.Module, experts: int, top_k: int = 2) -> torch.nn.Module:
    """``model`` with every block MLP replaced, in place, by a ``MoeMlp`` of ``experts`` copies of it (the
    structure a saved upcycled model's weights load into); returns ``model``."""
    if int(experts) < 1:
        raise CliplabError(f"clip-moe: experts must be at least 1, got {experts}")
    for block in moe_blocks(model):
        if isinstance(block.mlp, MoeMlp):
            raise CliplabError("clip-moe: the model's MLPs are MoE layers already")
        block.mlp = MoeMlp([copy.deepcopy(block.mlp) for _ in range(int(experts))], block.ln_2.normalized_shape[0],
                           top_k)
    return model


def moe_spec(model: torch.nn.Module) -> dict | None:
    """``{"experts": E, "top_k": k}`` of an upcycled model (what ``open_clip_config.json`` records), None for a dense
    one; refuses layers that differ (they could not be rebuilt from one spec)."""
    layers = [m for m in model.modules() if isinstance(m, MoeMlp)]
    if not layers:
        return None
    if len(layers) != len(moe_blocks(model)):
        raise CliplabError("clip-moe: only some block MLPs are MoE layers; a model folder needs all of them upcycled")
    specs = {(len(layer.experts), layer.top_k) for layer in layers}
    if len(specs) > 1:
        raise CliplabError(f"clip-moe: MoE layers with different expert counts or top-k ({sorted(specs)}) cannot be "
                           "saved as one model folder")
    experts, top_k = specs.pop()
    return {"experts": experts, "top_k": top_k}


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def build_moe_model(folder: str | Path, spec: dict, quick_gelu: bool) -> torch.nn.Module:
    """The dense open_clip architecture of ``folder`` with MoE layers per ``spec`` (weights not loaded yet); open_clip's
    "initialized randomly" warning is dropped, as the caller loads the folder's weights next."""
    import open_clip

    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(f"local-dir:{folder}", quick_gelu=quick_gelu, load_weights=False)
    finally:
        logging.getLogger().removeFilter(quiet)
    return add_moe_layers(model, spec["experts"], spec.get("top_k", 2))
