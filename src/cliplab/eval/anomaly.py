"""Anomaly detection metrics and the evaluation of anomaly maps (issue 27 item 4).

- image AUROC: scikit-learn's ``roc_auc_score`` of the 0/1 image labels against the image scores;
- pixel AUROC: the same over every pixel of every image (mask against map);
- AUPRO: the MVTec AD definition (Bergmann et al., IJCV 2021; the MVTec evaluation script's ``compute_pro`` and
  ``trapezoid``): ground-truth regions are the 8-connected components of each mask; at a threshold, a region's
  overlap is the share of its pixels scored at or above it, PRO the mean overlap over all regions of all images,
  FPR the share of defect-free pixels (of all images) at or above it. Every distinct score is a threshold, the
  curve starts at (0, 0), and the area under PRO(FPR) for FPR in [0, ``fpr_limit``] (0.3; the curve
  interpolated linearly at the limit) divided by the limit is the AUPRO. The authors of Bayes-PFL use a 200-step
  approximation with per-image thresholds rescaled to [0, 0.3]; the exact curve is computed here.
"""

from __future__ import annotations

import numpy as np

from ..errors import CliplabError

FPR_LIMIT = 0.3


def _check(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise CliplabError(f"anomaly maps {maps.shape} and masks {masks.shape} must both be (n, H, W)")
    if not np.isfinite(maps).all():
        raise CliplabError("anomaly maps hold NaN or infinite values")
    return masks, maps


def image_auroc(labels, scores) -> float:
    """ROC AUC of image ``scores`` for 0/1 ``labels`` (both classes needed)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) != 2:
        raise CliplabError("image AUROC needs both normal and anomalous images")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(masks, maps) -> float:
    """ROC AUC of all pixels of ``maps`` (n, H, W) against ``masks`` (n, H, W)."""
    from sklearn.metrics import roc_auc_score

    masks, maps = _check(masks, maps)
    if not masks.any() or masks.all():
        raise CliplabError("pixel AUROC needs both defect and defect-free pixels")
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, from (0, 0), as the MVTec AD script's ``compute_pro``."""
    from scipy.ndimage import label

    masks, maps = _check(masks, maps)
    fpr_step = np.zeros(maps.shape, dtype=np.float64)
    pro_step = np.zeros(maps.shape, dtype=np.float64)
    ok = ~masks
    if not ok.any():
        raise CliplabError("AUPRO needs defect-free pixels")
    fpr_step[ok] = 1.0 / ok.sum()
    regions = []
    for i, mask in enumerate(masks):
        components, count = label(mask, structure=np.ones((3, 3), dtype=int))
        regions.extend((i, components == k) for k in range(1, count + 1))
    if not regions:
        raise CliplabError("AUPRO needs at least one defect region")
    for i, region in regions:
        pro_step[i][region] = 1.0 / (len(regions) * region.sum())
    order = np.argsort(maps.ravel(), kind="mergesort")[::-1]
    scores = maps.ravel()[order]
    fpr = np.cumsum(fpr_step.ravel()[order])
    pro = np.cumsum(pro_step.ravel()[order])
    last = np.r_[scores[1:] != scores[:-1], True]  # the end of each run of equal scores
    fpr, pro = np.minimum(fpr[last], 1.0), np.minimum(pro[last], 1.0)
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(masks, maps, fpr_limit: float = FPR_LIMIT) -> float:
    """Area under PRO(FPR) up to ``fpr_limit``, divided by it (module docstring)."""
    if not 0 < fpr_limit <= 1:
        raise CliplabError(f"the AUPRO FPR limit must be in (0, 1]; got {fpr_limit}")
    fpr, pro = pro_curve(masks, maps)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        after = int(np.argmax(fpr > fpr_limit)) if (fpr > fpr_limit).any() else None
        if after is not None:  # interpolate PRO at the limit between the last point below and the first above
            x0, x1, y0, y1 = fpr[after - 1], fpr[after], pro[after - 1], pro[after]
            x, y = np.r_[x, fpr_limit], np.r_[y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / fpr_limit


def anomaly_metrics(labels, scores, masks, maps, fpr_limit: float = FPR_LIMIT) -> dict[str, float]:
    """Image AUROC, pixel AUROC and AUPRO."""
    return {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel_auroc(masks, maps),
            "aupro": aupro(masks, maps, fpr_limit)}


def evaluate_anomaly(backbone, test, *, method: str = "bayes-pfl", model=None, aux=None, object_name: str = "texture",
                     mode: str = "auto", size: int | None = None, samples: int = 5, seed: int = 0,
                     fit_params: dict | None = None) -> dict:
    """Score ``test`` (an ``AnomalySet``) with ``method`` ("winclip" or "bayes-pfl": a given ``model``, else one
    trained on ``aux``) and return its metrics with what ran."""
    import torch

    from ..regions.anomaly import PromptBaseline, patch_features

    if method not in ("winclip", "bayes-pfl"):
        raise CliplabError(f"anomaly method must be winclip or bayes-pfl; got {method!r}")
    features = patch_features(backbone, test.images(), mode=mode, size=size)
    out_size = test.size
    record = {"method": method, "model": backbone.display_name, "model_id": backbone.model_id,
              "patch_mode": features.mode, "input_size": features.size, "grid": list(features.grid),
              "test_images": len(test), "test_anomalous": int(test.labels.sum()), "object": object_name}
    if method == "winclip":
        result = PromptBaseline(backbone, object_name).score(features, out_size)
    else:
        if model is None:
            from ..regions.bayes_pfl import fit_bayes_pfl

            if aux is None:
                raise CliplabError("bayes-pfl needs a trained model or the auxiliary split to train on")
            aux_features = patch_features(backbone, aux.images(), mode=features.mode, size=features.size)
            model = fit_bayes_pfl(backbone, aux_features, aux.masks, aux.labels, object_name=object_name, seed=seed,
                                  **(fit_params or {}))
            record["aux_images"] = len(aux)
        model = model.with_object(object_name)
        result = model.predict(features, out_size, samples=samples, seed=seed)
        record["samples"] = samples
    with torch.no_grad():
        scores, maps = result.scores.numpy(), result.maps.numpy()
    record.update(anomaly_metrics(test.labels, scores, test.masks, maps))
    return record
