"""CLIP-MoE's Diversified Multiplet Upcycling (paper 46): fine-tuned MLP copies as experts, then routing.

``multiplet_upcycle(model, images, tokens, experts=E)``:

1. copy 0 is ``model`` itself (its MLPs are the first expert);
2. for k = 1 .. E-1: the pairs copy k-1 finds hard (the ``hard_fraction`` with the largest per-pair symmetric
   InfoNCE over the pool, ``pair_losses``) are clustered by k-means on copy k-1's joint image+text features
   (``clusters`` groups; cosine k-means of ``objectives_mlcd``); copy k starts from copy k-1 and fine-tunes only its
   block MLPs (both towers) with the ``clip`` loss on batches drawn within one cluster at a time (the paper's
   cluster-conditioned contrastive stages: negatives from the same cluster are the hard ones);
3. the copies' MLPs become the experts of top-``top_k`` routed MoE layers (``objectives_moe.upcycle``), and, with
   ``routing_steps``, the routers alone train on all pairs with ``clip-moe`` (``routers_only``).

Departures: the paper's multistage contrastive learning accumulates cluster labels over stages on a large corpus and
fine-tunes each stage far longer; here each stage reclusters the hard pairs of the stage before, on an in-memory
pool, for a few steps. Python only: an upcycled model is not an open_clip architecture (``cliplab pretrain`` writes
open_clip folders), so there is no command for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .engine import TrainSettings, get_objective, run_training
from .objectives_mlcd import spherical_kmeans
from .objectives_moe import _blocks, upcycle


@dataclass(frozen=True)
class MultipletStage:
    """What made copy ``k``: the pool indices copy k-1 found hard and their cluster labels (same order)."""

    k: int
    hard: tuple[int, ...]
    clusters: tuple[int, ...]


@torch.no_grad()
def pair_losses(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE over the pool: ``(CE(row i of s I T^T, i) + CE(column i, i)) / 2``, (n,)."""
    model.eval()
    img = F.normalize(model.encode_image(images).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
    logits = model.logit_scale.exp().float() * img @ txt.T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2


def hard_clusters(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, hard_fraction: float,
                  clusters: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the hardest ``hard_fraction`` of the pairs under ``model``, sorted; their k-means cluster labels on
    the concatenated unit image and text features)."""
    losses = pair_losses(model, images, tokens)
    count = max(clusters, int(round(hard_fraction * len(losses))))
    hard = torch.sort(losses.topk(min(count, len(losses))).indices).values
    with torch.no_grad():
        joint = torch.cat([F.normalize(model.encode_image(images[hard]).float(), dim=-1),
                           F.normalize(model.encode_text(tokens[hard]).float(), dim=-1)], dim=1)
    centres = spherical_kmeans(joint, clusters, seed=seed)
    return hard, (F.normalize(joint, dim=-1) @ centres.T).argmax(1)


def _mlp_only(model: torch.nn.Module) -> torch.nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for block in _blocks(model):
        for param in block.mlp.parameters():
            param.requires_grad_(True)
    return model


def multiplet_upcycle(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, experts: int = 4,
                      top_k: int = 2, hard_fraction: float = 0.5, clusters: int = 2, steps: int = 20,
                      batch_size: int = 16, lr: float = 1e-4, routing_steps: int = 0, balance: float = 0.01,
                      seed: int = 0, device: str | None = "cpu") -> tuple[torch.nn.Module, list[MultipletStage]]:
    """An upcycled copy of the open_clip ``model`` (never changed) and the stages that made its experts (module
    docstring); ``images`` (n, 3, H, W) and ``tokens`` (n, L) are the pool of pairs."""
    if experts < 1 or not 0 < hard_fraction <= 1 or clusters < 1 or steps < 1 or len(images) != len(tokens):
        raise CliplabError("multiplet upcycling: need experts >= 1, 0 < hard_fraction <= 1, clusters >= 1, "
                           "steps >= 1 and as many images as captions")
    copies, stages = [model], []
    for k in range(1, experts):
        previous = copies[-1]
        hard, labels = hard_clusters(previous, images, tokens, hard_fraction, clusters, seed + k)
        stages.append(MultipletStage(k, tuple(hard.tolist()), tuple(labels.tolist())))
        groups = [hard[labels == c] for c in range(clusters) if (labels == c).sum() >= 2]
        if not groups:
            raise CliplabError(f"multiplet upcycling: copy {k} has no cluster of two or more hard pairs")

        def data(epoch: int, start: int = 0, groups=groups, k=k):
            gen = torch.Generator().manual_seed(seed * 1000 + k * 100 + epoch)
            for step in range(start, steps):
                group = groups[step % len(groups)]
                pick = group[torch.randperm(len(group), generator=gen)[:batch_size]]
                yield {"images": images[pick], "tokens": tokens[pick]}

        current = _mlp_only(copy.deepcopy(previous))
        settings = TrainSettings(steps=steps, lr=lr, seed=seed + k, device=device, progress=False,
                                 desc=f"multiplet copy {k}")
        run_training(current, get_objective("clip"), data, settings)
        copies.append(current.cpu())
    moe = upcycle(model, top_k=top_k, expert_models=copies)
    if routing_steps:
        def routing(epoch: int, start: int = 0):
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            for _ in range(start, routing_steps):
                pick = torch.randperm(len(images), generator=gen)[:batch_size]
                yield {"images": images[pick], "tokens": tokens[pick]}

        settings = TrainSettings(steps=routing_steps, lr=lr, seed=seed, device=device, progress=False,
                                 desc="moe routing")
        run_training(moe, get_objective("clip-moe", balance=balance, routers_only=True), routing, settings)
        moe.cpu()
    return moe, stages
