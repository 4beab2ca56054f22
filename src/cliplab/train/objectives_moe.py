"""CLIP-MoE (paper 46): upcycling a dense CLIP's MLPs into top-k routed mixture-of-experts layers, and the objective
``"clip-moe"`` (CLIP's loss plus the routers' load-balancing loss) for ``train.engine.run_training``.

``upcycle(model, experts=E)`` replaces the MLP of every residual block of an open_clip model (both towers) by a
``MoeMlp`` of E experts; each expert is a copy of the dense MLP, or, for Diversified Multiplet Upcycling, the MLP of
the same block in each of ``expert_models`` (copies of the model fine-tuned in turn, the paper's multiplets). The
router is a bias-free linear layer initialised at zero (all experts equally likely); each token goes to its ``top_k``
experts with the softmax weights renormalised over them. The load-balancing loss of a layer is the Switch/GShard
form ``E * sum_e f_e P_e`` (``f_e`` the fraction of tokens whose top-1 choice is ``e``, ``P_e`` the mean router
probability of ``e``); it is 1 when routing is uniform.

``"clip-moe"``: ``clip + balance * mean over MoE layers of the load-balancing loss``; ``routers_only=True`` trains the
routers alone (the paper's short routing stage after assembling the experts). With one expert an upcycled model is
the dense model, and ``balance=0`` makes the objective the ``clip`` loss.

The multiplet stage (copies fine-tuned in turn on clusters of the pairs the previous copy found hard, then the
routing stage) is ``train/moe_upcycle.py: multiplet_upcycle``; any other copies can be passed as ``expert_models``.
``MoeMlp`` lives in ``models/moe.py`` (``load_model`` rebuilds a saved upcycled model from it); ``cliplab
moe-upcycle`` writes such a folder and ``cliplab pretrain --loss clip-moe --init-model FOLDER`` trains it on.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..errors import CliplabError
from ..models.moe import MoeMlp, moe_blocks
from .engine import default_param_groups, register_objective
from .objectives import ClipObjective, _model

_blocks = moe_blocks  # the blocks with an MLP (models/moe.py)


def upcycle(model: torch.nn.Module, experts: int = 4, top_k: int = 2,
            expert_models: Sequence[torch.nn.Module] | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose block MLPs are ``MoeMlp`` layers (module docstring); ``model`` never changes."""
    out = copy.deepcopy(model)
    sources = [_blocks(m) for m in expert_models] if expert_models else None
    for b, block in enumerate(_blocks(out)):
        if sources is not None:
            mlps = [copy.deepcopy(s[b].mlp) for s in sources]
        else:
            mlps = [copy.deepcopy(block.mlp) for _ in range(int(experts))]
        block.mlp = MoeMlp(mlps, block.ln_2.normalized_shape[0], top_k)
    return out


def moe_layers(model: torch.nn.Module) -> list[MoeMlp]:
    """The model's MoE layers, in module order."""
    return [m for m in model.modules() if isinstance(m, MoeMlp)]


@register_objective("clip-moe")
class ClipMoeObjective(ClipObjective):
    """CLIP's InfoNCE plus ``balance`` x the mean load-balancing loss of the MoE layers."""

    def __init__(self, balance: float = 0.01, routers_only: bool = False):
        if balance < 0:
            raise CliplabError("clip-moe: balance must be >= 0")
        super().__init__()
        self.balance, self.routers_only = float(balance), bool(routers_only)

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        """open_clip's split, or the routers alone (no weight decay) with ``routers_only``."""
        if not self.routers_only:
            return default_param_groups(module, weight_decay)
        return [{"params": [layer.router.weight for layer in moe_layers(module)], "weight_decay": 0.0}]

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        images, texts = self.features(module, batch)
        layers = moe_layers(_model(module))
        if not layers:
            raise CliplabError("clip-moe: the model has no MoE layers (upcycle it first: cliplab moe-upcycle, or "
                               "objectives_moe.upcycle)")
        scale = _model(module).logit_scale.exp()
        with torch.autocast(images.device.type, enabled=False):
            contrastive = self.loss(images, texts, scale.float())
            balance = torch.stack([layer.aux_loss.float() for layer in layers]).mean()
            loss = contrastive + self.balance * balance
        return loss, {"logit_scale": float(scale.detach()), "infonce": float(contrastive.detach()),
                      "balance": float(balance.detach())}
