"""OOD evaluation: an ID test set against OOD sets, several scores, OpenOOD's metrics, JSON + ROC/histogram PNGs.

Scores come from ``OOD_SCORES``: a name -> ``function(context, part) -> (n,) scores`` mapping (higher = more
in-distribution), where ``context`` (:class:`OODContext`) holds the backbone, the fitted zero-shot head, the class
text weights and a ``memo`` dict, and ``part`` (:class:`OODPart`) one dataset with its cached image features.
A score that needs a fitted head is one more entry that fits once per evaluation and keeps the head in
``memo``: ``cooked`` (paper 1) fits its linear probe on the ID dataset's train split, choosing C on its
val split (``fit_data``); the ID test set never reaches the fit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import ImageDataset
from ..errors import CliplabError, FeatureError
from ..features import ImageFeatures, class_weights, embed_images
from ..heads import create_head
from ..heads.cooked import cooked_scores
from ..ood import FPR_CONVENTIONS, atd_score, ctw_score, energy, glmcm, max_logit, mcm, msp, ood_metrics
from .plots import plot_ood_histograms, plot_ood_roc
from .results import results_record, write_json

NEEDS_FIT_DATA = ("score 'cooked' fits a linear probe: it needs the ID dataset's train and val splits (pass "
                  "fit_datasets, or use a named dataset / a folder with train/ and val/)")
NEEDS_CLIPN = ("the clipn scores need a trained CLIPN: pass --clipn FOLDER "
               "(cliplab.train.clipn.train_clipn(...).save(FOLDER))")


@dataclass
class OODPart:
    """One dataset of the evaluation (the ID test set or an OOD set) and its image features."""

    name: str
    dataset: ImageDataset
    features: ImageFeatures


@dataclass
class OODContext:
    """What score functions may use; ``memo`` keeps anything fitted or computed once per evaluation."""

    backbone: object
    class_names: list[str]
    templates: object
    head: object  # the fitted zero-shot head: logits for msp / max-logit / energy
    text_weights: np.ndarray  # (d, C) class weights for MCM and GL-MCM
    cache_dir: Path | None = None
    batch_size: int = 64
    temperature: float = 1.0
    lambda_local: float = 1.0
    memo: dict = field(default_factory=dict)
    fit_data: tuple[ImageFeatures, ImageFeatures] | None = None  # ID train and val features, for fitted scores
    clipn: object = None  # a trained cliplab.train.clipn.ClipnModel, for the clipn scores


def dense_features(backbone, dataset: ImageDataset, indices: Sequence[int], batch_size: int = 64) -> np.ndarray:
    """Projected, L2-normalised patch tokens (n, P, d) of ``dataset`` items ``indices``, computed in batches
    through ``backbone.dense_features`` (not cached)."""
    import torch

    blocks = []
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        batch = torch.stack([backbone.preprocess(dataset.load_image(int(i))) for i in chunk])
        blocks.append(backbone.dense_features(batch).numpy())
    if not blocks:
        raise FeatureError(f"{dataset.name}: no images to compute local features for")
    return np.concatenate(blocks)


def _logits(context: OODContext, part: OODPart) -> np.ndarray:
    key = ("logits", part.name)
    if key not in context.memo:
        context.memo[key] = context.head.logits(part.features.features)
    return context.memo[key]


def _glmcm(context: OODContext, part: OODPart) -> np.ndarray:
    local = dense_features(context.backbone, part.dataset, part.features.indices, context.batch_size)
    return glmcm(part.features.features, local, context.text_weights, context.temperature, context.lambda_local)


def _cooked(context: OODContext, part: OODPart) -> np.ndarray:
    """COOkeD's headline score (minus the entropy of the probe + zero-shot CLIP ensemble)."""
    if "cooked" not in context.memo:
        if context.fit_data is None:
            raise CliplabError(NEEDS_FIT_DATA)
        train, val = context.fit_data
        head = create_head("cooked", backbone=context.backbone, class_names=context.class_names)
        context.memo["cooked"] = head.fit(train.features, train.labels, X_val=val.features, y_val=val.labels)
    return cooked_scores(context.memo["cooked"], part.features.features)["entropy"]


def _clipn(rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[[OODContext, OODPart], np.ndarray]:
    """A CLIPN score (paper 18) from the trained model's yes/no probabilities."""

    def score(context: OODContext, part: OODPart) -> np.ndarray:
        from ..train.clipn import clipn_probabilities

        if context.clipn is None:
            raise CliplabError(NEEDS_CLIPN)
        key = ("clipn", part.name)
        if key not in context.memo:
            context.memo[key] = clipn_probabilities(context.clipn, part.features.features, context.class_names,
                                                    context.templates)
        return rule(*context.memo[key])

    return score


OOD_SCORES: dict[str, Callable[[OODContext, OODPart], np.ndarray]] = {
    "msp": lambda c, p: msp(_logits(c, p)),
    "max-logit": lambda c, p: max_logit(_logits(c, p)),
    "energy": lambda c, p: energy(_logits(c, p)),
    "mcm": lambda c, p: mcm(p.features.features, c.text_weights, c.temperature),
    "glmcm": _glmcm,
    "cooked": _cooked,
    "clipn-ctw": _clipn(ctw_score),
    "clipn-atd": _clipn(atd_score),
}


def _check_inputs(context: OODContext, scores: Sequence[str], id_dataset: ImageDataset,
                  fit_datasets) -> None:
    """Fail before any image is embedded when a score lacks what it needs."""
    if any(OOD_SCORES[s] is _cooked for s in scores) and fit_datasets is None:
        raise CliplabError(NEEDS_FIT_DATA)
    if any(s.startswith("clipn-") for s in scores) and context.clipn is None:
        raise CliplabError(NEEDS_CLIPN)
    if "glmcm" in scores:  # patch tokens: one image tells whether this model has them
        dense_features(context.backbone, id_dataset, [0], 1)


@dataclass
class OODReport:
    record: dict
    scores: dict[str, dict[str, np.ndarray]]  # score -> part name -> scores
    files: dict[str, Path]


def evaluate_ood(backbone, id_dataset: ImageDataset, ood_datasets: Sequence[ImageDataset], scores: Sequence[str],
                 templates, output_dir: Path | None = None, *, fpr_convention: str = "id-positive",
                 cache_dir: Path | None = None, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False, temperature: float = 1.0, lambda_local: float = 1.0,
                 fit_datasets: tuple[ImageDataset, ImageDataset] | None = None, clipn=None) -> OODReport:
    """Per score x OOD set: AUROC, FPR@95 (``fpr_convention``), AUPR-in/out (:func:`cliplab.ood.ood_metrics`), plus
    the zero-shot ID accuracy. Writes ``ood.json`` (atomically), ``ood_roc.png`` and ``ood_hist.png`` to
    ``output_dir`` when given. ``fit_datasets`` (ID train, ID val) feed scores that fit a head (``cooked``)."""
    unknown = [s for s in scores if s not in OOD_SCORES]
    if unknown:
        raise CliplabError(f"unknown OOD score {unknown[0]!r}; known: {', '.join(OOD_SCORES)}")
    if not scores:
        raise CliplabError("give at least one OOD score")
    if fpr_convention not in FPR_CONVENTIONS:
        raise CliplabError(f"unknown FPR convention {fpr_convention!r}; known: {', '.join(FPR_CONVENTIONS)}")
    if not ood_datasets:
        raise CliplabError("give at least one OOD dataset")
    class_names = list(id_dataset.class_names)
    if not class_names:
        raise CliplabError(f"{id_dataset.name}: the ID dataset has no class names")
    head = create_head("zeroshot", backbone=backbone, class_names=class_names, templates=templates,
                       cache_dir=cache_dir).fit()
    weights = class_weights(backbone, class_names, templates, cache_dir=cache_dir)
    context = OODContext(backbone, class_names, templates, head, weights, cache_dir, batch_size, temperature,
                         lambda_local, clipn=clipn)
    _check_inputs(context, scores, id_dataset, fit_datasets)

    def part(dataset: ImageDataset, name: str) -> OODPart:
        features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                                progress=progress)
        if not len(features):
            raise FeatureError(f"{name}: no image could be embedded")
        return OODPart(name, dataset, features)

    if fit_datasets is not None and any(OOD_SCORES[s] is _cooked for s in scores):
        context.fit_data = tuple(part(d, f"{d.name} ({d.split})").features.labelled() for d in fit_datasets)
    id_part = part(id_dataset, id_dataset.name)
    if context.fit_data is not None:
        test_ids = set(id_part.features.item_ids)
        shared = [i for f in context.fit_data for i in f.item_ids if i in test_ids]
        if shared:
            raise CliplabError(f"the ID fit data (train/val) shares {len(shared)} images with the ID test set, "
                               f"e.g. {shared[0]}")
    ood_parts, seen = [], {id_part.name}
    for dataset in ood_datasets:
        name = dataset.name
        while name in seen:
            name += "'"
        seen.add(name)
        ood_parts.append(part(dataset, name))

    predictions = _logits(context, id_part).argmax(axis=1)
    id_accuracy = float(np.mean(predictions == id_part.features.labels))
    values: dict[str, dict[str, np.ndarray]] = {}
    results: dict[str, dict[str, dict]] = {}
    for name in scores:
        values[name] = {p.name: np.asarray(OOD_SCORES[name](context, p), dtype=np.float64)
                        for p in (id_part, *ood_parts)}
        results[name] = {p.name: ood_metrics(values[name][id_part.name], values[name][p.name], fpr_convention)
                         for p in ood_parts}
    record = results_record(
        dataset=id_part.name, model=id_part.features.model, task="ood_detection",
        metrics={"id_accuracy": id_accuracy, "ood": results},
        extra={"fpr95_convention": fpr_convention, "scores": list(scores), "ood_datasets": [p.name for p in ood_parts],
               "id_split": id_dataset.split, "n_id": len(id_part.features), "temperature": temperature,
               "lambda_local": lambda_local, "templates": templates if isinstance(templates, str) else "custom",
               "failures": {p.name: p.features.failures for p in (id_part, *ood_parts) if p.features.failures}})
    files: dict[str, Path] = {}
    if output_dir is not None:
        output_dir = Path(output_dir)
        title = f"{id_part.name} vs OOD · {id_part.features.model_id}"
        files["json"] = write_json(record, output_dir / "ood.json")
        files["roc"] = plot_ood_roc(values, id_part.name, output_dir / "ood_roc.png", title)
        files["histogram"] = plot_ood_histograms(values, id_part.name, output_dir / "ood_hist.png", title)
    return OODReport(record, values, files)
