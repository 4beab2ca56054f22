"""Ranking-aware adapter (paper 15, Yu et al.): text-driven image ordering on a frozen CLIP.

The model (:class:`RankAdapter`) reads an image's tokens and the ranking text's tokens, both in the joint space:

- **cross-attention fusion**: image tokens and text tokens are projected to the adapter's width; each of
  ``layers`` blocks runs self-attention over the image tokens, then cross-attention from them to the text tokens
  (as the authors' ``CrossModalQKVFusion``: a residual block, then a cross-attention block), then an MLP;
- **regression head**: an MLP on the mean of the fused tokens (after a norm) gives one score per image, the
  ranking score used at inference;
- **rank-aware attention** (the auxiliary branch, the authors' ``MultiHeadRankawareAttentionV2``): learned query
  tokens attend over the *concatenated* fused tokens of a pair (i, j) with one softmax over both images' keys;
  the difference token is ``out_proj(A_i V_i - A_j V_j)`` (the part of the attention spent on i, minus the part
  on j), summed over the queries and scored by a pair head as the logit of "i ranks above j".

Loss (the authors' ``ClipAdapterLossV2`` with its regression and rank components): ``w_reg * log(1 +
smooth_l1(score, target))`` on targets scaled to [0, 1] plus ``w_pair`` times a pairwise loss on the pair logits
of every ordered pair of a batch with different targets: ``logistic`` (binary cross-entropy against 1[y_i >
y_j], the authors') or ``margin`` (``mean(max(0, m - sign(y_i - y_j) * logit))``); plus ``w_score`` times the
same pairwise loss on differences of the regression scores (the rank component of the authors' V1 loss,
``ClipWithAdapterLoss``; 0 turns it off). Training goes through the one loop (``train.engine.run_training``) on
cached tokens: the backbone stays frozen, as in the authors' runs. Image tokens are standardised per feature by
the training tokens' mean and standard deviation (buffers saved with the weights). Given ``groups`` (an ordinal
set's source images), each batch holds whole groups, so the pair losses see pairs that differ only in the
property; otherwise batches are a seeded permutation of the items.

Image tokens: a ViT's patch tokens in the joint space (``models.dense``, the final path on the model's centre
crop, L2-normalised, through the dense cache); a tower without patch tokens (ResNet, whose 32 px grid is 1 x 1)
gives its image embedding as one token. Text tokens: every position of the text tower up to the pooled
end-of-text token, through the final norm and projection (the last one is the text embedding itself).

Departures from the authors' code (github.com/uynaes/RankingAwareCLIP, ``clip_model_adapter.py``, ``loss.py``):
the output projection of the difference tokens has no bias and the pair head is antisymmetrised,
``logit(i, j) = h(D_ij) - h(-D_ij)``, so (i, i) gives logit 0 and swapping a pair negates its logit exactly
(theirs adds a bias and an MLP after the difference); the regression head reads the mean of the tokens (theirs
the sum); pairs with equal targets are left out of the pair loss (theirs count them as "not above"); no
learnable text tokens, no post-fusion encoder, no dropout, no absolute-zero BCE term (dataset-specific); text
and image tokens are those of the joint space (theirs: unprojected text tokens and the tower's output tokens);
the V1 score-pair term is on by default beside V2's terms, the input standardisation and grouped batches are
cliplab's (on the 32 px ResNet signal model, random batches and raw tokens left the fit far below a ridge
regression on the same embeddings). Outside comparison (/work/compare/rank, the authors' classes run on the same
weights and inputs): difference tokens equal to 1.8e-7; their V2 loss equals cliplab's terms exactly once their
diagonal pairs (logit 0, target 0: log 2 each) are counted in.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CliplabError, DenseFeaturesUnavailableError, UnsupportedOperationError

WEIGHTS = "rank_adapter.safetensors"
CONFIG = "rank_adapter.json"
FORMAT = "cliplab-rank-adapter-1"
PAIR_LOSSES = ("logistic", "margin")


class RankAdapterError(CliplabError, ValueError):
    """Bad ranking-adapter input or settings (one line)."""


# -- the model ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterConfig:
    """Shape of a :class:`RankAdapter`: ``dim`` (the joint space), ``width`` (None: ``dim``), attention ``heads``
    (must divide the width), fusion ``layers``, ``queries`` (learned query tokens of the rank-aware attention).
    Width 128 and 2 layers were chosen on a validation part of the blur set's train half (signal model)."""

    dim: int
    width: int | None = 128
    heads: int = 4
    layers: int = 2
    queries: int = 4
    mlp_ratio: float = 2.0

    def __post_init__(self):
        width = self.width or self.dim
        if min(self.dim, width, self.heads, self.layers, self.queries) < 1:
            raise RankAdapterError("rank adapter: dim, width, heads, layers and queries must be at least 1")
        if width % self.heads:
            raise RankAdapterError(f"rank adapter: {self.heads} heads do not divide the width {width}")

    @property
    def inner(self) -> int:
        return int(self.width or self.dim)


class FusionBlock(nn.Module):
    """Self-attention over the image tokens, cross-attention to the text tokens, MLP (pre-norm, residual)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_query = nn.LayerNorm(width)
        self.ln_text = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        t = self.ln_text(text)
        x = x + self.cross_attn(self.ln_query(x), t, t, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


class RankAwareAttention(nn.Module):
    """Learned queries attending over a pair's concatenated tokens; :meth:`difference_tokens` gives
    ``out_proj(A_i V_i - A_j V_j)`` per pair (keys and values are one projection, as the authors')."""

    def __init__(self, width: int, heads: int, queries: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.queries = nn.Parameter(torch.randn(queries, width) * width ** -0.5)
        self.q_proj, self.kv_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.ln_q, self.ln_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, width, bias=False)  # no bias: (i, i) -> 0 and (j, i) = -(i, j)

    def difference_tokens(self, x: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """``x`` (B, P, W) fused tokens, ``pairs`` (M, 2) item indices -> difference tokens (M, Q, W)."""
        b, p, w = x.shape
        h, dh = self.heads, self.head_dim
        q = self.ln_q(self.q_proj(self.queries)).view(-1, h, dh).transpose(0, 1)  # (H, Q, dh)
        kv = self.ln_kv(self.kv_proj(x)).view(b, p, h, dh).transpose(1, 2)  # (B, H, P, dh)
        scores = torch.einsum("hqd,bhpd->bhqp", q, kv) / math.sqrt(dh)  # (B, H, Q, P)
        first, second = pairs[:, 0], pairs[:, 1]
        attention = torch.softmax(torch.cat([scores[first], scores[second]], dim=-1), dim=-1)  # (M, H, Q, 2P)
        values = (torch.einsum("mhqp,mhpd->mhqd", attention[..., :p], kv[first])
                  - torch.einsum("mhqp,mhpd->mhqd", attention[..., p:], kv[second]))  # (M, H, Q, dh)
        values = values.transpose(1, 2).reshape(len(pairs), -1, w)
        return self.out_proj(values)


class RankAdapter(nn.Module):
    """Cross-attention fusion of image and text tokens, a regression head and the rank-aware pair branch."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        width = config.inner
        # image tokens are standardised per feature by the training tokens' statistics (set by the fit)
        self.register_buffer("token_mean", torch.zeros(config.dim))
        self.register_buffer("token_scale", torch.ones(config.dim))
        self.image_in = nn.Linear(config.dim, width)
        self.text_in = nn.Linear(config.dim, width)
        self.blocks = nn.ModuleList(FusionBlock(width, config.heads, config.mlp_ratio) for _ in range(config.layers))
        self.ln_out = nn.LayerNorm(width)
        self.regressor = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        self.rank_attention = RankAwareAttention(width, config.heads, config.queries)
        self.pair_head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def _check(self, images: torch.Tensor, text: torch.Tensor) -> None:
        dim = self.config.dim
        if images.dim() != 3 or images.shape[-1] != dim:
            raise RankAdapterError(f"rank adapter: image tokens {tuple(images.shape)}; expected (n, tokens, {dim})")
        if text.dim() != 2 or text.shape[-1] != dim or not len(text):
            raise RankAdapterError(f"rank adapter: text tokens {tuple(text.shape)}; expected (tokens, {dim})")

    def fuse(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image tokens (B, P, dim) fused with the text tokens (T, dim) -> (B, P, width)."""
        self._check(images, text)
        x = self.image_in((images - self.token_mean) / self.token_scale)
        t = self.text_in(text).unsqueeze(0).expand(len(x), -1, -1)
        for block in self.blocks:
            x = block(x, t)
        return self.ln_out(x)

    def score(self, fused: torch.Tensor) -> torch.Tensor:
        """Regression scores (B,) of fused tokens."""
        return self.regressor(fused.mean(dim=1)).squeeze(-1)

    def pair_logits(self, fused: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """Logits (M,) of "pairs[:, 0] ranks above pairs[:, 1]", antisymmetric in the pair."""
        d = self.rank_attention.difference_tokens(fused, pairs).sum(dim=1)
        return (self.pair_head(d) - self.pair_head(-d)).squeeze(-1)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.score(self.fuse(images, text))


def all_pairs(n: int, device=None) -> torch.Tensor:
    """Every ordered pair (i, j), i != j, of ``n`` items: (n (n - 1), 2)."""
    i, j = torch.meshgrid(torch.arange(n, device=device), torch.arange(n, device=device), indexing="ij")
    keep = i != j
    return torch.stack([i[keep], j[keep]], dim=1)


def pair_loss(logits: torch.Tensor, pairs: torch.Tensor, targets: torch.Tensor, kind: str = "logistic",
              margin: float = 1.0) -> torch.Tensor:
    """The pairwise loss over ``pairs`` whose targets differ (0 when none do): logistic = BCE against
    1[y_i > y_j]; margin = mean(max(0, margin - sign(y_i - y_j) * logit))."""
    if kind not in PAIR_LOSSES:
        raise RankAdapterError(f"pair loss {kind!r}: choose from {', '.join(PAIR_LOSSES)}")
    sign = torch.sign(targets[pairs[:, 0]] - targets[pairs[:, 1]])
    keep = sign != 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, sign = logits[keep], sign[keep].to(logits.dtype)
    if kind == "logistic":
        return F.binary_cross_entropy_with_logits(logits, (sign > 0).to(logits.dtype))
    return torch.clamp(margin - sign * logits, min=0).mean()


def regression_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The authors' scaled regression term: log(1 + smooth_l1(score, target))."""
    return torch.log1p(F.smooth_l1_loss(scores, targets.to(scores.dtype)))


# -- training ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankTrainSettings:
    """How to fit: epochs, lr (AdamW, cosine), batch size, weight decay, loss weights (regression, the rank-aware
    branch's pairs, pairs of regression scores), pair loss kind and margin, seed."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.05
    regression_weight: float = 1.0
    pair_weight: float = 1.0
    score_pair_weight: float = 1.0  # the pairwise loss on regression-score differences (the authors' V1 loss)
    pair: str = "logistic"
    margin: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise RankAdapterError("rank training: epochs >= 1, batch size >= 2 and lr > 0")
        if self.pair not in PAIR_LOSSES:
            raise RankAdapterError(f"pair loss {self.pair!r}: choose from {', '.join(PAIR_LOSSES)}")
        weights = (self.regression_weight, self.pair_weight, self.score_pair_weight)
        if min(weights) < 0 or self.regression_weight + self.score_pair_weight == 0:
            raise RankAdapterError("rank training: loss weights must be >= 0 and the regression or score-pair weight "
                                   "above 0 (they train the ranking score)")


class RankObjective:
    """``regression_weight * regression_loss + pair_weight * pair_loss`` on a batch of tokens and targets."""

    def __init__(self, settings: RankTrainSettings):
        self.settings = settings

    def __call__(self, module: RankAdapter, batch: dict) -> tuple[torch.Tensor, dict]:
        s = self.settings
        fused = module.fuse(batch["images"], batch["text"])
        targets = batch["targets"]
        scores = module.score(fused)
        reg = regression_loss(scores, targets)
        pairs = all_pairs(len(targets), device=targets.device)
        pair = pair_loss(module.pair_logits(fused, pairs), pairs, targets, s.pair, s.margin)
        loss = s.regression_weight * reg + s.pair_weight * pair
        logs = {"regression": float(reg.detach()), "pair": float(pair.detach())}
        if s.score_pair_weight:
            differences = scores[pairs[:, 0]] - scores[pairs[:, 1]]
            score_pair = pair_loss(differences, pairs, targets, s.pair, s.margin)
            loss = loss + s.score_pair_weight * score_pair
            logs["score_pair"] = float(score_pair.detach())
        return loss, logs


@dataclass
class FittedRanker:
    """A trained adapter with what it was trained for: the ranking text, the backbone's model id, the target
    range (scores are in target units after ``low + score * (high - low)``), the token source, the history."""

    adapter: RankAdapter
    text: str
    model_id: str
    low: float
    high: float
    tokens: str = ""
    settings: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)  # what the caller measured after fitting (kept in the card)

    @torch.no_grad()
    def scores(self, image_tokens, text_tokens, batch_size: int = 256) -> np.ndarray:
        """Ranking scores (n,) in target units for image tokens (n, P, d) and the text tokens (T, d)."""
        return self.low + predict(self.adapter, image_tokens, text_tokens, batch_size) * (self.high - self.low)

    def save(self, folder: str | Path) -> Path:
        """Weights (safetensors) and a JSON card into ``folder``."""
        from safetensors.torch import save_file

        from ..fileio import atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.adapter.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))
        card = {"format": FORMAT, "config": asdict(self.adapter.config), "text": self.text, "model_id": self.model_id,
                "low": self.low, "high": self.high, "tokens": self.tokens, "settings": self.settings,
                "history": self.history, "seconds": round(self.seconds, 3), "metrics": self.metrics}
        atomic_write_text(folder / CONFIG, json.dumps(card, indent=2) + "\n")
        return folder


def load_ranker(folder: str | Path) -> FittedRanker:
    """A :class:`FittedRanker` saved by :meth:`FittedRanker.save`; one line when the folder is not one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    card_path, weights = folder / CONFIG, folder / WEIGHTS
    if not card_path.is_file() or not weights.is_file():
        raise RankAdapterError(f"{folder}: not a rank adapter folder (needs {CONFIG} and {WEIGHTS}; make one with "
                               "cliplab rank-train)")
    try:
        card = json.loads(card_path.read_text())
        if card.get("format") != FORMAT:
            raise ValueError(f"format {card.get('format')!r}")
        adapter = RankAdapter(AdapterConfig(**card["config"]))
        adapter.load_state_dict(load_file(str(weights)))
    except RankAdapterError:
        raise
    except Exception as exc:  # a damaged card or weights file
        raise RankAdapterError(f"{folder}: unreadable rank adapter ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    adapter.eval()
    return FittedRanker(adapter, card["text"], card["model_id"], float(card["low"]), float(card["high"]),
                        card.get("tokens", ""), card.get("settings", {}), card.get("history", []),
                        float(card.get("seconds", 0.0)), card.get("metrics", {}))


def _tensor(values, name: str, dims: int) -> torch.Tensor:
    out = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: cached tokens are read-only
    if out.dim() != dims or not out.shape[0]:
        raise RankAdapterError(f"rank adapter: {name} must be a non-empty {dims}-d array; got shape {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise RankAdapterError(f"rank adapter: {name} holds NaN or infinite values")
    return out


def group_batches(groups, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Item indices in batches of whole groups: the groups in ``rng``'s order, packed while a batch stays within
    ``size`` items (a group larger than ``size`` is a batch of its own); every item once."""
    groups = np.asarray(groups).ravel()
    out, current = [], []
    for name in rng.permutation(np.unique(groups)):
        members = np.flatnonzero(groups == name).tolist()
        if current and len(current) + len(members) > size:
            out.append(np.asarray(current))
            current = []
        current += members
    return out + [np.asarray(current)] if current else out


def fit_rank_adapter(image_tokens, targets, text_tokens, *, text: str = "", model_id: str = "", tokens: str = "",
                     settings: RankTrainSettings = RankTrainSettings(), config: AdapterConfig | None = None,
                     progress: bool = False, device: str | None = "cpu", checkpoint_dir: str | Path | None = None,
                     evaluate=None, groups=None) -> FittedRanker:
    """Train a :class:`RankAdapter` on image tokens (n, P, d) with float ``targets`` (n,) for the text tokens
    (T, d) through ``run_training``; targets are scaled to [0, 1] by their range for the regression term, image
    tokens standardised per feature by their statistics here. ``groups`` (n,), e.g. the source image of each item
    of an ordinal set, makes every batch hold whole groups (a seeded draw of groups per epoch), so the pair loss
    sees pairs that differ only in the property; without it batches are a seeded permutation of the items."""
    from .engine import TrainSettings, run_training

    images = _tensor(image_tokens, "image tokens", 3)
    y = _tensor(targets, "targets", 1)
    text_t = _tensor(text_tokens, "text tokens", 2)
    if len(y) != len(images):
        raise RankAdapterError(f"rank adapter: {len(images)} images but {len(y)} targets")
    low, high = float(y.min()), float(y.max())
    if high <= low:
        raise RankAdapterError("rank adapter: every target is the same; ranking needs at least two levels")
    scaled = (y - low) / (high - low)
    config = config or AdapterConfig(dim=images.shape[-1])
    if images.shape[-1] != config.dim:
        raise RankAdapterError(f"rank adapter: image tokens {tuple(images.shape)}; expected (n, tokens, {config.dim})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        adapter = RankAdapter(config)
    flat = images.reshape(-1, images.shape[-1])
    with torch.no_grad():
        adapter.token_mean.copy_(flat.mean(dim=0))
        adapter.token_scale.copy_(flat.std(dim=0, unbiased=False) + 1e-6)
    n, size = len(images), min(settings.batch_size, len(images))
    if groups is not None:
        groups = np.asarray(groups).ravel()
        if len(groups) != n:
            raise RankAdapterError(f"rank adapter: {n} images but {len(groups)} groups")

    def data(epoch: int, start: int = 0):
        rng = np.random.default_rng([settings.seed, epoch])
        if groups is None:
            order = rng.permutation(n)
            batches = [order[b * size:(b + 1) * size] for b in range(max(1, n // size))]
        else:
            batches = group_batches(groups, size, rng)
        for idx in batches[start:]:
            idx = torch.as_tensor(idx)
            yield {"images": images[idx], "text": text_t, "targets": scaled[idx]}

    identity = json.dumps({"config": asdict(config), "text": text, "model_id": model_id, "n": n,
                           "grouped": groups is not None})
    train = TrainSettings(epochs=settings.epochs, lr=settings.lr, weight_decay=settings.weight_decay,
                          seed=settings.seed, device=device, progress=progress, desc="rank adapter",
                          checkpoint_dir=checkpoint_dir, identity=identity)
    began = time.perf_counter()
    result = run_training(adapter, RankObjective(settings), data, train, evaluate=evaluate)
    adapter.cpu().eval()
    return FittedRanker(adapter, text, model_id, low, high, tokens, asdict(settings), result.history,
                        time.perf_counter() - began)


@torch.no_grad()
def predict(adapter: RankAdapter, image_tokens, text_tokens, batch_size: int = 256) -> np.ndarray:
    """Regression scores (n,) of the adapter, in its [0, 1] target scale."""
    adapter.eval()
    device = next(adapter.parameters()).device
    images = _tensor(image_tokens, "image tokens", 3)
    text = _tensor(text_tokens, "text tokens", 2).to(device)
    out = [adapter(images[i:i + batch_size].to(device), text).float().cpu() for i in range(0, len(images),
                                                                                          batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


# -- tokens from a backbone --------------------------------------------------------------------------------
@torch.no_grad()
def text_tokens(backbone, text: str) -> torch.Tensor:
    """The ranking text's tokens in the joint space (T, d), L2-normalised: every position up to the pooled one,
    through the tower's end (final norm, projection); the last row is the text embedding. A backbone without a
    block-by-block text tower (or one not pooling a position) gives its text embedding as one token."""
    if not isinstance(text, str) or not text.strip():
        raise RankAdapterError("the ranking text is empty; say what to rank by (e.g. \"how blurry is the image\")")
    try:
        tower = backbone.text_tower()
    except UnsupportedOperationError:
        tower = None
    if tower is not None:
        ids = backbone.tokenize([text]).to(backbone.device)
        x, state = tower.begin(ids, None)
        if state.pooled is not None:
            for j in range(tower.depth):
                x = tower.block(j, x, state)
            last = int(state.pooled[0])
            positions = torch.arange(last + 1, device=x.device)
            state.pooled = positions
            out = tower.end(x.expand(len(positions), -1, -1), state)
            return F.normalize(out.float(), dim=-1).cpu()
    return backbone.encode_texts([text]).float()


def token_source(backbone) -> str:
    """What :func:`image_tokens` gives for ``backbone``: ``"patches"`` (a ViT) or ``"embedding"`` (one token)."""
    from ..models.dense import dense_tower

    try:
        dense_tower(backbone)
    except DenseFeaturesUnavailableError:
        return "embedding"
    return "patches"


def image_tokens(backbone, dataset, cache_dir=None, *, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False) -> tuple[np.ndarray, list[int], list[tuple[str, str]], str]:
    """Tokens (n, P, d) of the readable images of ``dataset`` through the feature caches: a ViT's patch tokens
    (``features.dense.embed_dense``, one grid), else the image embedding as one token (``embed_images``).
    Returns the tokens, the dataset indices they belong to, the failures (item id, reason) and the source name."""
    source = token_source(backbone)
    if source == "patches":
        from ..features.dense import embed_dense

        dense = embed_dense(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                            progress=progress)
        if len(dense) and dense.grid_shape is None:
            raise RankAdapterError(f"{dataset.name}: images gave patch grids of several sizes; ranking needs one")
        tokens = np.asarray(dense.tokens, dtype=np.float32) if len(dense) else np.zeros((0, 1, backbone.embed_dim),
                                                                                         np.float32)
        grid = dense.grid_shape
        name = f"patches {grid[0]}x{grid[1]}" if grid else "patches"
        return tokens, [int(i) for i in dense.indices], list(dense.failures), name
    from ..features import embed_images

    feats = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers, progress=progress)
    indices = [int(i) for i in feats.indices]
    return np.asarray(feats.features, dtype=np.float32)[:, None, :], indices, list(feats.failures), "embedding"


def rank_order(scores: Sequence[float], descending: bool = True) -> np.ndarray:
    """Positions sorted by score (stable: ties keep their input order)."""
    s = np.asarray(scores, dtype=np.float64)
    return np.argsort(-s if descending else s, kind="stable")
