"""Retrieval fine-tuning with maintained alignment (paper 5, Schall et al. 2024, "2SFT"): ``retrieval_tune``.

Stage 1 tunes the image side for image retrieval with a metric-learning loss on a labelled set; stage 2 re-aligns
the text side to the frozen new image space with a contrastive loss on captions and/or pseudo-captions
(``"a photo of a {class}."`` from a template set), so text search and zero-shot classification keep working
against the one new image embedding.

What is tuned (a departure, said here): the paper fine-tunes the whole image encoder (stage 1) and the whole text
encoder (stage 2). Here each side gets a light residual linear adapter on its output embedding,
``f' = normalise(f + f A)`` with ``A`` (d, d) started at zero (the identity map), trained on cached, frozen
embeddings through the one training loop (``train.engine.run_training``): an epoch never re-encodes an image, so
it runs in seconds on a CPU. Because the adapter is linear it is merged exactly into the tower's output
projection (``apply_adapters``: ``P' = P + P A`` for open_clip's ``x @ P`` projections, ``W' = W + A^T W`` and
``b' = b + b A`` for linear ones: ResNet attention-pool ``c_proj``, Hugging Face projections), so the tuned model
is an ordinary derived Backbone (any runtime, its own ``model_id``, features cached apart from its parent's).
Stage 2 changes only the text projection, so image embeddings stay bit-identical to stage 1's.

Losses. Stage 1: ArcFace / ArcMargin (Deng et al.; the paper's L_ArcMargin), ``arcface_loss``: class centres
``w_c`` (started at the normalised class means of the training features, discarded after), logits
``s cos(theta_j)`` and ``s cos(theta_y + m)`` for the true class, with insightface's fallback
``cos(theta_y) - m sin(m)`` where ``theta_y + m > pi``; cross-entropy. Stage 2: InfoNCE (the paper's
L_InfoNCE, CLIP's symmetric loss) at a fixed temperature (default ``1 / backbone.logit_scale``), with the
positives of a row being every text of its group (``group_infonce``): a caption's group is its image, a
pseudo-caption's its class, so two images of one class in a batch are not pushed from each other's pseudo-caption.
With every group distinct it is CLIP's loss exactly. Pseudo-captions: each labelled image is paired with one of its
class's template sentences per epoch (seeded draw).

The authors' repository (Visual-Computing/MCIP) publishes only model checkpoints, no training code, so the losses
follow the paper's formulas. Outside comparison (/work/compare/retrieval_tune): ``arcface_loss`` against
insightface's ``recognition/arcface_torch/losses.py`` (``ArcFace``, ``CombinedMarginLoss(s, 1, m, 0)``) on identical
float64 cosines: max abs difference of the loss 7e-15 over 60 draws where ``theta_y + m <= pi``. Two departures
from that code: past ``pi - m`` insightface keeps ``cos(theta + m)`` (which turns back up) where this uses the
classic monotonic fallback above; and insightface applies the margin under ``no_grad`` (its gradient is the
plain cosine softmax's at the margin logits), where this differentiates ``cos(theta + m)``. ``group_infonce`` with
distinct groups equals open_clip's ``ClipLoss`` (tested). MCIP (the paper's second method, pseudo-captions inside
stage 1's ArcMargin loss) is not implemented.

Saved as ``adapters.safetensors`` (``image_adapter``, ``text_adapter``) + ``retrieval_tune.json`` (the base
model id, settings, histories); ``load_tuned(folder).apply(backbone)`` gives the tuned Backbone.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CliplabError, DatasetError
from ..fileio import atomic_write, atomic_write_text, digest
from .engine import TrainSettings, run_training

FORMAT = "cliplab-retrieval-tune-1"
WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "retrieval_tune.json"
TAG = "rtune"


# -- losses ------------------------------------------------------------------------------------
def arcface_loss(features: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, margin: float = 0.2,
                 scale: float = 30.0) -> torch.Tensor:
    """ArcFace (additive angular margin) cross-entropy of ``features`` (n, d) against class ``centres`` (C, d).

    Both are L2-normalised here; ``cos_j = <x, w_j>``; the true class's logit is ``scale * cos(theta_y + margin)``
    (``cos(theta_y) - margin * sin(margin)`` where ``theta_y > pi - margin``), the others ``scale * cos_j``.
    """
    if features.ndim != 2 or centres.ndim != 2 or features.shape[1] != centres.shape[1]:
        raise CliplabError(f"arcface: features {tuple(features.shape)} and centres {tuple(centres.shape)} must be "
                           "(n, d) and (C, d)")
    cos = F.normalize(features, dim=-1) @ F.normalize(centres, dim=-1).T
    cos = cos.clamp(-1.0, 1.0)
    target = cos.gather(1, labels.view(-1, 1))
    sin = torch.sqrt((1.0 - target * target).clamp_min(0.0))
    shifted = target * math.cos(margin) - sin * math.sin(margin)
    shifted = torch.where(target > math.cos(math.pi - margin), shifted, target - margin * math.sin(margin))
    logits = cos.scatter(1, labels.view(-1, 1), shifted) * scale
    return F.cross_entropy(logits, labels)


def group_infonce(images: torch.Tensor, texts: torch.Tensor, groups: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of row-paired ``images`` and ``texts`` (n, d, L2-normalised) where every pair of rows in
    the same ``group`` is a positive: ``1/2 [mean_r -log sum_{c in P(r)} softmax_c(v_r . t_c / T) + mean_c -log
    sum_{r in P(c)} softmax_r(v_r . t_c / T)]``. All groups distinct: CLIP's loss."""
    logits = images @ texts.T / temperature
    positive = groups.view(-1, 1) == groups.view(1, -1)
    i2t = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 1) - torch.logsumexp(logits, 1)
    t2i = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), 0) - torch.logsumexp(logits, 0)
    return -(i2t.mean() + t2i.mean()) / 2


# -- adapters ----------------------------------------------------------------------------------
class ResidualAdapter(torch.nn.Module):
    """``normalise(x + x A)``, ``A`` (d, d) from zero: the identity map until trained."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + x @ self.weight, dim=-1)


class _ImageStage(torch.nn.Module):
    def __init__(self, dim: int, centres: torch.Tensor):
        super().__init__()
        self.adapter = ResidualAdapter(dim)
        self.centres = torch.nn.Parameter(centres.clone())


def adapt(features: np.ndarray, adapter: np.ndarray | None) -> np.ndarray:
    """``normalise(x + x A)`` of L2-normalised rows (numpy, float32); ``None``: ``normalise(x)``."""
    x = np.asarray(features, dtype=np.float32)
    if adapter is not None:
        x = x + x @ np.asarray(adapter, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _output_projection(backbone, tower: str) -> tuple[str, torch.nn.Module, str]:
    """``(kind, module, attribute)`` of the last linear map of ``tower``: kind ``matrix`` (``emb = x @ P``) or
    ``linear`` (an ``nn.Linear``); a model without a known one is refused in one line."""
    model = backbone.model
    if tower == "image":
        visual = getattr(model, "visual", None)
        if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
            return "matrix", visual, "proj"
        pool = getattr(visual, "attnpool", None)
        if isinstance(getattr(pool, "c_proj", None), torch.nn.Linear):
            return "linear", pool.c_proj, "weight"
        if isinstance(getattr(model, "visual_projection", None), torch.nn.Linear):
            return "linear", model.visual_projection, "weight"
    else:
        holder = getattr(model, "text", None) or model
        proj = getattr(holder, "text_projection", None)
        if isinstance(proj, torch.nn.Parameter):
            return "matrix", holder, "text_projection"
        if isinstance(proj, torch.nn.Linear):
            return "linear", proj, "weight"
    raise CliplabError(f"retrieval-tune: {backbone.info.name} has no {tower} output projection this method can "
                       "merge an adapter into (supported: open_clip ViT and ResNet towers, CLIP text towers, "
                       "Hugging Face CLIPModel)")


@torch.no_grad()
def _merge(backbone, tower: str, adapter: np.ndarray) -> None:
    kind, module, attribute = _output_projection(backbone, tower)
    param = getattr(module, attribute)
    a = torch.as_tensor(np.asarray(adapter, dtype=np.float32)).to(param.device, param.dtype)
    if kind == "matrix":  # emb = x @ P  ->  x @ (P + P A)
        if param.shape[1] != a.shape[0]:
            raise CliplabError(f"retrieval-tune: a {a.shape[0]}-d adapter does not fit the {param.shape[1]}-d "
                               f"{tower} embedding of {backbone.info.name}")
        param.copy_(param + param @ a)
        return
    if param.shape[0] != a.shape[0]:  # emb = x W^T + b  ->  W' = W + A^T W, b' = b + b A
        raise CliplabError(f"retrieval-tune: a {a.shape[0]}-d adapter does not fit the {param.shape[0]}-d "
                           f"{tower} embedding of {backbone.info.name}")
    param.copy_(param + a.T @ param)
    if module.bias is not None:
        module.bias.copy_(module.bias + module.bias @ a)


def apply_adapters(backbone, image_adapter: np.ndarray | None, text_adapter: np.ndarray | None, tag: str = TAG):
    """A derived copy of ``backbone`` (``derive(tag)``, frozen) with the adapters merged into its image and text
    output projections: its ``encode_images`` / ``encode_texts`` give ``normalise(f + f A)``. A ``None`` adapter
    leaves that tower as it is; zero adapters leave both bit-identical."""
    derived = backbone.derive(tag, trainable=False)
    for tower, adapter in (("image", image_adapter), ("text", text_adapter)):
        if adapter is not None:
            _merge(derived, tower, adapter)
    derived._digest_memo = None
    return derived


# -- settings and result -----------------------------------------------------------------------
@dataclass(frozen=True)
class RetrievalTuneConfig:
    """What decides a tuning run (saved in the JSON; a resume must repeat it)."""

    stage1_epochs: int = 10
    stage2_epochs: int = 10
    lr: float = 1e-3
    stage2_lr: float | None = None  # None: lr
    batch_size: int = 256
    weight_decay: float = 0.0
    margin: float = 0.2  # ArcFace angular margin m (radians)
    scale: float = 30.0  # ArcFace scale s
    temperature: float | None = None  # stage 2 InfoNCE; None: 1 / backbone.logit_scale
    pseudo_captions: bool = True
    templates: str | tuple[str, ...] = "cifar10"
    seed: int = 0

    def __post_init__(self):
        if self.stage1_epochs < 0 or self.stage2_epochs < 0 or self.stage1_epochs + self.stage2_epochs == 0:
            raise CliplabError("retrieval-tune: stage epochs must be >= 0, and at least one stage must run")
        if self.batch_size < 2:
            raise CliplabError(f"retrieval-tune: batch size {self.batch_size} must be at least 2")
        if self.lr <= 0 or (self.stage2_lr is not None and self.stage2_lr <= 0):
            raise CliplabError("retrieval-tune: learning rates must be positive")
        if not 0.0 <= self.margin < math.pi / 2 or self.scale <= 0:
            raise CliplabError(f"retrieval-tune: margin {self.margin} must lie in [0, pi/2) and scale "
                               f"{self.scale} be positive")
        if self.temperature is not None and self.temperature <= 0:
            raise CliplabError(f"retrieval-tune: temperature {self.temperature} must be positive")


@dataclass
class RetrievalTuned:
    """The two adapters (d, d) and what made them; ``apply(backbone)`` gives the tuned Backbone."""

    image_adapter: np.ndarray | None
    text_adapter: np.ndarray | None
    base_model_id: str
    config: dict
    info: dict = field(default_factory=dict)

    def apply(self, backbone, tag: str = TAG):
        """``apply_adapters`` on ``backbone``, which must be the model the adapters were trained on."""
        if backbone.model_id != self.base_model_id:
            raise CliplabError(f"retrieval-tune: these adapters were trained on {self.base_model_id}, not "
                               f"{backbone.model_id}; load them with the model they were trained on")
        return apply_adapters(backbone, self.image_adapter, self.text_adapter, tag)

    def save(self, folder: str | Path) -> Path:
        """``adapters.safetensors`` + ``retrieval_tune.json`` in ``folder`` (each written atomically)."""
        from safetensors.numpy import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in
                   (("image_adapter", self.image_adapter), ("text_adapter", self.text_adapter)) if v is not None}
        atomic_write(folder / WEIGHTS_FILE, lambda handle: handle.write(save(tensors)))
        record = {"format": FORMAT, "base_model_id": self.base_model_id, "config": self.config,
                  "adapters": sorted(tensors), **self.info}
        atomic_write_text(folder / CONFIG_FILE, json.dumps(record, indent=2, default=str) + "\n")
        return folder


def load_tuned(folder: str | Path) -> RetrievalTuned:
    """What ``RetrievalTuned.save`` wrote; a folder that is not one is refused in one line."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        record = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise CliplabError(f"{folder}: not a retrieval-tune folder ({CONFIG_FILE} + {WEIGHTS_FILE}): "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CliplabError(f"{folder / CONFIG_FILE}: not a retrieval-tune record (format {FORMAT} expected)")
    info = {k: v for k, v in record.items() if k not in ("format", "base_model_id", "config", "adapters")}
    return RetrievalTuned(tensors.get("image_adapter"), tensors.get("text_adapter"), record["base_model_id"],
                          record["config"], info)


# -- the two stages on features ------------------------------------------------------------------
def _batches(n: int, batch: int, seed: int, epoch: int, salt: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, salt, epoch]).permutation(n)
    return [order[b:b + batch] for b in range(0, n, batch)]


class _Epoch:
    """An epoch's batches, made one at a time; sized, so the progress bar knows the run's length."""

    def __init__(self, indices: list[np.ndarray], make: Callable[[np.ndarray], dict]):
        self.indices, self.make = indices, make

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return (self.make(idx) for idx in self.indices)


def class_means(features: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """(C, d) L2-normalised mean feature of each class (a class without rows: zeros)."""
    out = np.zeros((classes, features.shape[1]), dtype=np.float64)
    np.add.at(out, labels, features.astype(np.float64))
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32)


def image_retrieval_precision(features: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Leave-one-out image -> image precision@k: the mean fraction of each image's k nearest other images
    (cosine) that share its label."""
    x = torch.tensor(np.asarray(features, dtype=np.float32))  # a copy: cached features are read-only
    y = torch.tensor(np.asarray(labels, dtype=np.int64))
    if len(x) < 2:
        raise DatasetError("image retrieval precision needs at least two images")
    k = min(k, len(x) - 1)
    hits = []
    for start in range(0, len(x), 1024):
        scores = x[start:start + 1024] @ x.T
        rows = torch.arange(start, min(start + 1024, len(x)))
        scores[torch.arange(len(rows)), rows] = float("-inf")
        top = torch.topk(scores, k, dim=1).indices
        hits.append((y[top] == y[rows].view(-1, 1)).float().mean(1))
    return float(torch.cat(hits).double().mean())


def _settings(config: RetrievalTuneConfig, stage: int, checkpoint_dir, progress: bool, device, identity: dict,
              eval_every: int) -> TrainSettings:
    epochs = config.stage1_epochs if stage == 1 else config.stage2_epochs
    lr = config.lr if stage == 1 or config.stage2_lr is None else config.stage2_lr
    return TrainSettings(epochs=epochs, lr=lr, weight_decay=config.weight_decay, seed=config.seed + stage,
                         device=device, progress=progress, desc=f"retrieval-tune stage {stage}",
                         checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"stage{stage}",
                         checkpoint_seconds=60.0 if checkpoint_dir is not None else 0.0, eval_every=eval_every,
                         identity=json.dumps(identity, sort_keys=True, default=str))


def tune_image_side(features: np.ndarray, labels: Sequence[int], config: RetrievalTuneConfig, *,
                    val: tuple[np.ndarray, np.ndarray] | None = None, checkpoint_dir: str | Path | None = None,
                    progress: bool = False, device: str | None = "cpu", identity: dict | None = None):
    """Stage 1 on frozen image features (n, d) with class labels: the image adapter (d, d) trained with
    ``arcface_loss``; returns ``(adapter, TrainResult)``. ``val`` (features, labels) adds the held-out
    leave-one-out image -> image precision@1 to the progress bar and history."""
    x = adapt(features, None)
    y = np.array(labels, dtype=np.int64)  # a copy: cached labels are read-only
    if x.ndim != 2 or len(x) != len(y):
        raise CliplabError(f"retrieval-tune: {len(y)} labels for image features of shape {x.shape}")
    if not len(y) or y.min() < 0:
        raise CliplabError("retrieval-tune stage 1: every training image needs a class label (>= 0)")
    if len(np.unique(y)) < 2:
        raise CliplabError("retrieval-tune stage 1: the labelled set has one class; metric learning needs two or more")
    classes = int(y.max()) + 1
    module = _ImageStage(x.shape[1], torch.from_numpy(class_means(x, y, classes)))
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)

    def objective(net, batch):
        loss = arcface_loss(net.adapter(batch["x"]), net.centres, batch["y"], config.margin, config.scale)
        return loss, {"arcface": float(loss.detach())}

    def data(epoch, start=0):
        return _Epoch(_batches(len(x), config.batch_size, config.seed, epoch, 1)[start:],
                      lambda idx: {"x": xs[idx], "y": ys[idx]})

    evaluate = None
    if val is not None:
        vx, vy = adapt(val[0], None), np.asarray(val[1], dtype=np.int64)

        def evaluate():
            weight = module.adapter.weight.detach().cpu().numpy()
            return {"val_p@1": image_retrieval_precision(adapt(vx, weight), vy)}

    settings = _settings(config, 1, checkpoint_dir, progress, device,
                         {"stage": 1, "config": asdict(config), **(identity or {})}, 1 if val is not None else 0)
    result = run_training(module, objective, data, settings, evaluate=evaluate)
    return module.adapter.weight.detach().cpu().numpy().astype(np.float32), result


def realign_text_side(image_features: np.ndarray, text_features: np.ndarray, pairs: Callable[[int], np.ndarray],
                      temperature: float, config: RetrievalTuneConfig, *,
                      evaluate: Callable[[np.ndarray], dict] | None = None,
                      checkpoint_dir: str | Path | None = None, progress: bool = False, device: str | None = "cpu",
                      identity: dict | None = None):
    """Stage 2: the text adapter (d, d) trained with ``group_infonce`` against the frozen (already adapted)
    ``image_features`` (n, d). ``pairs(epoch)`` gives that epoch's (p, 3) int rows ``(image row, text row,
    group)`` into ``image_features`` / ``text_features`` (m, d). ``evaluate(adapter)`` gives held-out numbers.
    Returns ``(adapter, TrainResult)``."""
    v = torch.from_numpy(adapt(image_features, None))
    t = torch.from_numpy(adapt(text_features, None))
    module = ResidualAdapter(v.shape[1])

    def objective(net, batch):
        loss = group_infonce(batch["v"], net(batch["t"]), batch["g"], temperature)
        return loss, {"infonce": float(loss.detach())}

    def data(epoch, start=0):
        rows = torch.as_tensor(np.asarray(pairs(epoch), dtype=np.int64))
        if rows.ndim != 2 or rows.shape[1] != 3 or not len(rows):
            raise CliplabError("retrieval-tune stage 2: no (image, text) pairs to align")

        def make(idx):
            chosen = rows[torch.from_numpy(idx)]
            return {"v": v[chosen[:, 0]], "t": t[chosen[:, 1]], "g": chosen[:, 2]}

        return _Epoch(_batches(len(rows), config.batch_size, config.seed, epoch, 2)[start:], make)

    hook = None if evaluate is None else (lambda: evaluate(module.weight.detach().cpu().numpy()))
    settings = _settings(config, 2, checkpoint_dir, progress, device,
                         {"stage": 2, "config": asdict(config), "temperature": temperature, **(identity or {})},
                         1 if evaluate is not None else 0)
    result = run_training(module, objective, data, settings, evaluate=hook)
    return module.weight.detach().cpu().numpy().astype(np.float32), result


# -- the whole method on datasets ----------------------------------------------------------------
def pseudo_caption_texts(class_names: Sequence[str], templates) -> list[list[str]]:
    """Per class, its template sentences (``class_prompts``: ``"a photo of a {c}."`` ...)."""
    from ..data.prompts import class_prompts

    return [list(p) for p in class_prompts(list(class_names), templates)]


def retrieval_tune(backbone, labelled, config: RetrievalTuneConfig | None = None, *, captioned=None,
                   val=None, cache_dir: str | Path | None = None, checkpoint_dir: str | Path | None = None,
                   batch_size: int = 64, workers: int | None = None, progress: bool = False,
                   device: str | None = "cpu") -> RetrievalTuned:
    """Both stages: stage 1 on ``labelled`` (an ImageDataset with class labels: CIFAR-10 train, a class folder),
    stage 2 on ``labelled``'s pseudo-captions (``config.pseudo_captions``) and/or ``captioned``'s (image,
    caption) pairs (a COCO-style set or caption manifest). ``val``: a labelled held-out set for the progress
    numbers (image -> image P@1, zero-shot top-1). ``checkpoint_dir``: each stage checkpoints there and a rerun
    with the same options resumes. Images and texts are embedded once through the feature caches."""
    from ..features.embed import embed_images
    from ..features.text import embed_texts

    start = time.perf_counter()
    config = config or RetrievalTuneConfig()
    if not config.pseudo_captions and captioned is None and config.stage2_epochs:
        raise CliplabError("retrieval-tune stage 2 needs texts: keep pseudo-captions on or give a captioned set")
    if captioned is not None and captioned.captions is None:
        raise DatasetError(f"{captioned.name}: has no captions to align (a COCO-style set or a caption manifest)")

    def embed(dataset):
        return embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                            progress=progress)

    feats = embed(labelled)
    keep = np.asarray(feats.labels) >= 0
    if not keep.any():
        raise DatasetError(f"{labelled.name}: no labelled images to tune on (give a class-folder set or CIFAR-10)")
    x, y = np.asarray(feats.features)[keep], np.asarray(feats.labels, dtype=np.int64)[keep]
    names = list(feats.class_names)
    identity = {"model": backbone.model_id, "labelled": [labelled.name, labelled.split, len(y),
                                                        digest(*map(str, np.asarray(feats.indices)[keep]))[:12]],
                "captioned": None if captioned is None else [captioned.name, captioned.split, len(captioned)]}
    val_xy = None
    if val is not None:
        vf = embed(val)
        vkeep = np.asarray(vf.labels) >= 0
        val_xy = (np.asarray(vf.features)[vkeep], np.asarray(vf.labels, dtype=np.int64)[vkeep])
    info: dict = {"base_display_name": backbone.display_name, "embed_dim": int(backbone.embed_dim),
                  "class_names": names, "labelled": {"dataset": labelled.name, "split": labelled.split,
                                                     "images": int(len(y))}}
    image_adapter, text_adapter = None, None
    if config.stage1_epochs:
        image_adapter, result = tune_image_side(x, y, config, val=val_xy, checkpoint_dir=checkpoint_dir,
                                                progress=progress, device=device, identity=identity)
        info["stage1"] = {"steps": result.steps, "seconds": round(result.seconds, 3), "last_loss": result.last_loss,
                          "history": result.history}
    if config.stage2_epochs:
        temperature = config.temperature or 1.0 / backbone.logit_scale
        image_rows, texts, fixed, pseudo = [x], [], [], None
        if config.pseudo_captions:
            per_class = pseudo_caption_texts(names, config.templates)
            offsets = np.cumsum([0] + [len(p) for p in per_class])
            texts += [s for p in per_class for s in p]
            counts = np.asarray([len(p) for p in per_class])
            pseudo = (offsets, counts)
        n_labelled = len(x)
        if captioned is not None:
            cf = embed(captioned)
            image_rows.append(np.asarray(cf.features))
            for row, item in enumerate(cf.indices):
                for caption in captioned.captions[int(item)]:
                    if isinstance(caption, str) and caption.strip():
                        fixed.append((n_labelled + row, len(texts), len(names) + row))
                        texts.append(caption)
            if not fixed:
                raise DatasetError(f"{captioned.name}: none of its images has a caption")
        images = adapt(np.concatenate(image_rows), image_adapter)
        text_features = embed_texts(backbone, texts, cache_dir)
        fixed_rows = np.asarray(fixed, dtype=np.int64).reshape(-1, 3)

        def pairs(epoch: int) -> np.ndarray:
            parts = [fixed_rows]
            if pseudo is not None:
                offsets, counts = pseudo
                draw = np.random.default_rng([config.seed, 3, epoch]).integers(0, counts[y])
                parts.insert(0, np.stack([np.arange(n_labelled), offsets[y] + draw, y], axis=1))
            return np.concatenate(parts)

        evaluate = None
        if val_xy is not None and config.pseudo_captions:
            vx = adapt(val_xy[0], image_adapter)
            class_rows = [text_features[offsets[c]:offsets[c + 1]] for c in range(len(names))]

            def evaluate(adapter: np.ndarray) -> dict:
                weights = np.stack([adapt(adapt(r, adapter).mean(0, keepdims=True), None)[0] for r in class_rows])
                return {"val_zeroshot": float(np.mean((vx @ weights.T).argmax(1) == val_xy[1]))}

        text_adapter, result = realign_text_side(images, text_features, pairs, temperature, config,
                                                 evaluate=evaluate, checkpoint_dir=checkpoint_dir, progress=progress,
                                                 device=device, identity=identity)
        info["stage2"] = {"steps": result.steps, "seconds": round(result.seconds, 3), "last_loss": result.last_loss,
                          "history": result.history, "temperature": temperature, "texts": len(texts),
                          "caption_pairs": int(len(fixed_rows))}
    info["seconds"] = round(time.perf_counter() - start, 3)
    return RetrievalTuned(image_adapter, text_adapter, backbone.model_id, _plain(asdict(config)), info)


def _plain(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
