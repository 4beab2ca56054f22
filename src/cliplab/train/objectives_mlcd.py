"""Multi-label cluster discrimination (MLCD, paper 27): the objective ``"mlcd"`` for ``train.engine.run_training``.

``loss = clip + weight * mlcd``: the ``clip`` objective exactly (open_clip's ``ClipLoss``) plus the MLCD term on the
batch's image features. The MLCD term (paper eq. 5) treats the ``positives`` cluster centres nearest to each image as
its labels and, with ``c_j`` the cosine between the image feature and the learnable class prototype ``w_j``::

    mlcd_i = log(1 + sum_{j in negatives} exp(s c_j)) + log(1 + sum_{j in positives} exp(-s (c_j - m)))

(positives and negatives separated, the decision boundary at cosine ``m``). Negatives are all other classes, or with
``sample_rate < 1`` a random subset of the classes (every class that is some image's positive is kept, as
PartialFC keeps the batch's positive centres), drawn from torch's RNG (seeded per step by the engine).

Clustering and its schedule: the objective keeps a ring buffer (``bank``) of the latest detached image features; when
it is full, and every ``recluster_every`` steps after, spherical k-means (``kmeans_iters`` rounds, seeded by
``(seed, step)``) over the buffer gives ``centres`` cluster centres, and the prototypes ``w`` are reset to them (the
classes change meaning at each re-clustering, as DeepCluster resets its classifier). Labels are the nearest centres of
each image's current (detached) feature. Before the first clustering the term is 0. Prototypes, centres, buffer and
step count are the objective's state, kept in the engine's checkpoint, so a resumed run repeats an uninterrupted one.

Defaults are sized for cliplab's small recipes (batches of 64-256): 32 centres over the latest 512 features, 2
positives each, re-clustered every 50 steps, scale 32, no margin.

Departures (the authors' MLCD training code is not public: deepglint/unicom holds PartialFC and the models, not the
multi-label loss): the paper clusters LAION-400M once into one million centres with an off-the-shelf model and
trains the image tower on that classification alone; here the clusters come from the training model's own features
over a feature buffer, re-clustered on a schedule, and the term is added to CLIP's contrastive loss (``weight``).
The prototypes train with the model's optimiser (no weight decay); their Adam moments are not reset at re-clustering.

Measured at the recipe's budget (``benchmarks/results/objectives_recipe_budget.md``, RN, 1,600 steps of batch 256 on
CIFAR-10 captions): with these defaults the term fights the contrastive one and wins. It rises from 5 to 34 as
training gathers each class's images, and zero-shot ends at 20.0% (CLIP alone: 72.5%). The reason is the data:
32 centres over 10 classes put a class's sibling clusters among each image's negatives, at cosine 0.90 to their
nearest centre. On the finished CLIP model's features the term is already 25 (12 with 8 positives). With
``weight=0.1`` the run reaches 67.0%; no setting tried beat CLIP alone here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import CliplabError
from .engine import default_param_groups, register_objective
from .objectives import ClipObjective, _model


def mlcd_loss(features: torch.Tensor, prototypes: torch.Tensor, positives: torch.Tensor, scale: float = 32.0,
              margin: float = 0.0, sample_rate: float = 1.0) -> torch.Tensor:
    """Mean over images of the multi-label cluster discrimination loss (module docstring).

    ``features`` (n, d) and ``prototypes`` (k, d) are L2-normalised here; ``positives`` (n, p) holds each image's
    positive class indices. ``sample_rate`` < 1 keeps every batch positive class plus random others up to
    ``ceil(sample_rate * k)`` classes (torch's RNG).
    """
    cos = F.normalize(features.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T
    n, k = cos.shape
    pos = torch.zeros(n, k, dtype=torch.bool, device=cos.device)
    pos.scatter_(1, positives.long(), True)
    keep = torch.ones(k, dtype=torch.bool, device=cos.device)
    if sample_rate < 1.0:
        wanted = max(1, math.ceil(sample_rate * k))
        keep = pos.any(0)
        rest = (~keep).nonzero().flatten()
        extra = max(0, wanted - int(keep.sum()))
        if extra and len(rest):
            keep[rest[torch.randperm(len(rest))[:extra].to(rest.device)]] = True
    neg = keep.unsqueeze(0) & ~pos
    zero = cos.new_zeros(n, 1)
    neg_logits = torch.where(neg, scale * cos, torch.full_like(cos, -math.inf))
    pos_logits = torch.where(pos, -scale * (cos - margin), torch.full_like(cos, -math.inf))
    neg_term = torch.logsumexp(torch.cat([zero, neg_logits], 1), 1)  # log(1 + sum exp)
    pos_term = torch.logsumexp(torch.cat([zero, pos_logits], 1), 1)
    return (neg_term + pos_term).mean()


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """(k, d) unit-norm centres of ``x`` (n, d) by cosine k-means: ``k`` distinct rows drawn with ``seed`` start it,
    then ``iters`` rounds of assign-to-nearest / normalised mean (an empty cluster keeps its centre)."""
    if x.shape[0] < k:
        raise CliplabError(f"mlcd: {x.shape[0]} features cannot make {k} clusters")
    x = F.normalize(x.float(), dim=-1)
    gen = torch.Generator().manual_seed(int(seed))
    centres = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centres[filled] = F.normalize(sums[filled], dim=-1)
    return centres


def _embed_dim(net: torch.nn.Module) -> int:
    projection = getattr(net, "text_projection", None)
    if isinstance(projection, torch.Tensor) and projection.ndim == 2:
        return int(projection.shape[1])
    dim = getattr(getattr(net, "visual", None), "output_dim", None)
    if dim is None:
        raise CliplabError("mlcd: cannot tell the model's embedding width (no text_projection or visual.output_dim)")
    return int(dim)


@register_objective("mlcd")
class MlcdObjective(ClipObjective):
    """CLIP's InfoNCE plus ``weight`` x the MLCD term over online k-means clusters (module docstring)."""

    def __init__(self, weight: float = 1.0, centres: int = 32, positives: int = 2, sample_rate: float = 1.0,
                 scale: float = 32.0, margin: float = 0.0, bank: int = 512, recluster_every: int = 50,
                 kmeans_iters: int = 10, seed: int = 0):
        if not 1 <= positives < centres or bank < centres or recluster_every < 1 or not 0 < sample_rate <= 1:
            raise CliplabError("mlcd: need 1 <= positives < centres <= bank, recluster_every >= 1 and "
                               "0 < sample_rate <= 1")
        super().__init__()
        self.weight, self.k, self.p, self.sample_rate = float(weight), int(centres), int(positives), float(sample_rate)
        self.scale, self.margin, self.bank_size = float(scale), float(margin), int(bank)
        self.recluster_every, self.kmeans_iters, self.seed = int(recluster_every), int(kmeans_iters), int(seed)
        self.prototypes: torch.nn.Parameter | None = None
        self.centres: torch.Tensor | None = None
        self.bank: torch.Tensor | None = None
        self.filled = 0  # features written to the ring buffer so far
        self.calls = 0  # steps seen
        self.last_cluster = -1  # the step of the latest clustering

    # -- state the optimiser and the checkpoint see --------------------------------------------------------------
    def _ensure(self, dim: int, device: torch.device) -> None:
        if self.prototypes is None:
            self.prototypes = torch.nn.Parameter(torch.zeros(self.k, dim, device=device))
            self.centres = torch.zeros(0, dim, device=device)
            self.bank = torch.zeros(self.bank_size, dim, device=device)

    def param_groups(self, module: torch.nn.Module, weight_decay: float) -> list[dict]:
        """open_clip's split for the model, and the class prototypes without weight decay."""
        device = next(module.parameters()).device
        self._ensure(_embed_dim(module), device)
        self.prototypes.data = self.prototypes.data.to(device)
        self.centres, self.bank = self.centres.to(device), self.bank.to(device)
        return default_param_groups(module, weight_decay) + [{"params": [self.prototypes], "weight_decay": 0.0}]

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.detach().cpu().clone(), "centres": self.centres.cpu().clone(),
                "bank": self.bank.cpu().clone(), "filled": self.filled, "calls": self.calls,
                "last_cluster": self.last_cluster}

    def load_state_dict(self, state: dict) -> None:
        self._ensure(state["prototypes"].shape[1], state["prototypes"].device)
        device = self.prototypes.device
        with torch.no_grad():
            self.prototypes.copy_(state["prototypes"].to(device))
        self.centres, self.bank = state["centres"].to(device), state["bank"].to(device)
        self.filled, self.calls, self.last_cluster = int(state["filled"]), int(state["calls"]), \
            int(state["last_cluster"])

    # -- the step -----------------------------------------------------------------------------------------------
    def _remember(self, feats: torch.Tensor) -> None:
        rows = torch.arange(self.filled, self.filled + len(feats), device=feats.device) % self.bank_size
        self.bank[rows] = feats.detach().to(self.bank.dtype)
        self.filled += len(feats)

    def _recluster_due(self) -> bool:
        if self.filled < self.bank_size:
            return False
        return self.last_cluster < 0 or self.calls - self.last_cluster >= self.recluster_every

    def __call__(self, module, batch: dict) -> tuple[torch.Tensor, dict]:
        images, texts = self.features(module, batch)
        self._ensure(images.shape[1], images.device)
        scale = _model(module).logit_scale.exp()
        with torch.autocast(images.device.type, enabled=False):
            contrastive = self.loss(images, texts, scale.float())
            self._remember(images)
            if self._recluster_due():
                self.centres = spherical_kmeans(self.bank, self.k, self.kmeans_iters,
                                                seed=self.seed * 1_000_003 + self.calls)
                with torch.no_grad():
                    self.prototypes.copy_(self.centres)
                self.last_cluster = self.calls
            term = images.new_zeros(())
            if len(self.centres) and self.weight:
                labels = (images.detach() @ self.centres.T).topk(self.p, dim=1).indices
                term = mlcd_loss(images, self.prototypes, labels, self.scale, self.margin, self.sample_rate)
            loss = contrastive + self.weight * term
        self.calls += 1
        return loss, {"logit_scale": float(scale.detach()), "infonce": float(contrastive.detach()),
                      "mlcd": float(term.detach())}
