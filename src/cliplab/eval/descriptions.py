"""Semantic gain vs ensembling gain of a description set (paper 30's question, with WaffleCLIP's control).

Paper 30 ("Does VLM Classification Benefit from LLM Description Semantics?", code CompVis/DisCLIP) asks how much
of a description head's gain over the templates comes from what the descriptions say and how much from averaging
many perturbed class-name prompts. :func:`semantic_vs_ensembling` scores, on the same image features:

- ``templates``: the zero-shot classifier (CLIP's ensembling over ``templates``);
- ``descriptions``: DCLIP (paper 7): mean similarity to "{template}, which (is/has) {d}" over the class's own ``d``;
- ``random``: WaffleCLIP's control, the same number of random word/character descriptors for every class
  (``heads.waffle.waffle_descriptors``), one run per seed: mean ± std;
- ``reassigned``: paper 30's semantic-agnostic control (their ``random_assignment``): each class gets as many
  descriptions as it has, drawn with replacement from the pool of every class's descriptions (duplicates
  dropped, as their mask does), phrased like DCLIP; one run per seed: mean ± std.

``semantic gain = descriptions - random`` and ``ensembling gain = random - templates`` (means over seeds), so
``descriptions - templates = semantic + ensembling``. Departure: paper 30 also sweeps a class-name weight in its
class-name-free scenario (one class-name prompt plus class-name-free descriptions); that sweep is not run here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.descriptions import load_descriptions
from ..data.prompts import check_class_names, descriptor_sentence, load_templates
from ..errors import FeatureError
from ..features.text import class_weights, embed_prompts, ensemble
from ..fileio import atomic_write_text
from ..heads.waffle import character_list, waffle_descriptors
from ..models.backbone import Backbone


def _labelled(features, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of the labelled rows from an ``ImageFeatures`` or an ``(X, y)`` pair."""
    X, y = (features.features, features.labels) if hasattr(features, "features") else features
    X, y = np.asarray(X, dtype=np.float32), np.asarray(y)
    keep = y >= 0
    if not keep.any():
        raise FeatureError("semantic_vs_ensembling: no labelled rows")
    if y[keep].max() >= n_classes:
        raise FeatureError(f"semantic_vs_ensembling: labels must be class indices 0..{n_classes - 1}")
    return X[keep], y[keep].astype(np.int64)


def _accuracy(X: np.ndarray, y: np.ndarray, weights: np.ndarray) -> float:
    return float(np.mean(np.argmax(X @ weights, axis=1) == y))


def _description_weights(backbone, names, templates, per_class: Sequence[Sequence[str]], cache_dir) -> np.ndarray:
    sentences = [[descriptor_sentence(t, name, d) for t in templates for d in (descs or [""])]
                 for name, descs in zip(names, per_class)]
    return ensemble(embed_prompts(backbone, sentences, cache_dir), renormalize=False)


def semantic_vs_ensembling(
    backbone: Backbone,
    features,
    class_names: Sequence[str],
    descriptions: str | Path | Mapping[str, Sequence[str]],
    *,
    templates: str | Sequence[str] = ("{c}",),
    n_random: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    subset: bool = False,
    cache_dir: str | Path | None = None,
    output: str | Path | None = None,
) -> dict:
    """Top-1 accuracy (fractions) of templates, descriptions, the random control and the reassigned control, and
    the semantic and ensembling gains; written as JSON to ``output`` if given. ``n_random`` random descriptors per
    class default to WaffleCLIP's budget, ``ceil(total descriptions / classes)``."""
    names = check_class_names(list(class_names), "class names")
    templates = load_templates(templates)
    X, y = _labelled(features, len(names))
    per_class = load_descriptions(descriptions, names, subset=subset)
    own = [list(per_class[name]) for name in names]
    seeds = [int(s) for s in seeds] or [0]
    n = int(n_random) if n_random is not None else math.ceil(sum(map(len, own)) / len(names))
    chars = character_list(per_class)
    pool = list(dict.fromkeys(d for descs in own for d in descs))

    templates_acc = _accuracy(X, y, class_weights(backbone, names, templates, cache_dir=cache_dir))
    descriptions_acc = _accuracy(X, y, _description_weights(backbone, names, templates, own, cache_dir))
    random_runs, reassigned_runs = [], []
    for seed in seeds:
        shared = waffle_descriptors(names, math.ceil(n / 2), seed, chars)[:n]
        random_runs.append(_accuracy(X, y, _description_weights(backbone, names, templates, [shared] * len(names),
                                                                cache_dir)))
        rng = np.random.default_rng([seed, 30])
        drawn = [list(dict.fromkeys(pool[i] for i in rng.integers(len(pool), size=len(descs)))) for descs in own]
        reassigned_runs.append(_accuracy(X, y, _description_weights(backbone, names, templates, drawn, cache_dir)))

    random_mean = float(np.mean(random_runs))
    result = {
        "model": backbone.model_id,
        "n_images": int(len(y)),
        "n_classes": len(names),
        "templates": templates,
        "descriptions_per_class": [min(map(len, own)), max(map(len, own))],
        "n_random": n,
        "seeds": seeds,
        "accuracy": {
            "templates": templates_acc,
            "descriptions": descriptions_acc,
            "random": {"mean": random_mean, "std": float(np.std(random_runs)), "runs": random_runs},
            "reassigned": {"mean": float(np.mean(reassigned_runs)), "std": float(np.std(reassigned_runs)),
                           "runs": reassigned_runs},
        },
        "semantic_gain": descriptions_acc - random_mean,
        "ensembling_gain": random_mean - templates_acc,
        "total_gain": descriptions_acc - templates_acc,
    }
    result["rows"] = rows(result)
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def rows(result: dict) -> list[list[str]]:
    """Print-ready rows (header first): method, top-1 % (mean ± std over seeds for the controls)."""
    acc = result["accuracy"]
    out = [["method", "top-1 %"], ["templates", f"{100 * acc['templates']:.2f}"],
           ["descriptions (DCLIP)", f"{100 * acc['descriptions']:.2f}"]]
    for key, label in (("random", f"random descriptors x{result['n_random']} (WaffleCLIP)"),
                       ("reassigned", "descriptions reassigned across classes")):
        out.append([label, f"{100 * acc[key]['mean']:.2f} ± {100 * acc[key]['std']:.2f}"])
    for key in ("semantic_gain", "ensembling_gain", "total_gain"):
        out.append([key.replace("_", " "), f"{100 * result[key]:+.2f}"])
    return out
