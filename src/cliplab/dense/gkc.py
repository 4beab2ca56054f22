"""GKC (Han et al., ICCV 2023, "Global Knowledge Calibration for Fast Open-Vocabulary Segmentation"): synonym-
diversified class text and text-guided knowledge distillation, for any dense method.

**Synonym classifier** (:func:`synonym_classifier`). Each class is named by itself and its synonyms (a JSON file
``{class: [synonyms]}`` or the LLM layer: ``cliplab.data.synonyms.resolve_synonyms``); every name gets its own
prompt ensemble (the templates, CLIP's renormalised mean), and a class's score is the **mean of its names' cosine
scores**: the authors' ``clusterAvg`` (``loss_syn_label``: ``cls_pred.index_select(2, ind).mean(...)`` over a class's
synonym columns). Because the mean of cosines to unit vectors is the cosine to their (unrenormalised) mean, the
classifier is one (d, C) matrix, ``weights[:, c] = mean_s t_s``, which every dense method takes as its text weights
(``Segmenter(..., synonyms=...)``, ``cliplab segment --synonyms FILE``); one name per class gives exactly the plain
classifier. Their ``clusterMax`` (max over a class's names) is not linear in the text weights: it is available as
``SynonymClassifier.logits(features, "max")`` for code that scores features itself, not through the pipeline.

**Text-guided distillation** (:func:`text_guided_kd_loss`), as the authors' ``loss_text_kd`` (their
``maskformer_model_voca_dense_kd_syn.py``): for the student's region embeddings ``v`` and the frozen CLIP's
embeddings ``c`` of the same (masked) regions, both L2-normalised, and the (normalised) text embeddings ``t`` of
each region's class (or its drawn synonym), the plain term is ``||v_i - c_i||^2`` per region and the text-guided
term ``(s^2 t_i . t_j - v_i . c_j)^2`` for every pair of regions of one image (``s`` their learnable
``text_kd_logit_scale``, 1 at init); with ``separate=False`` (their default, no extra text weight) the loss is the
mean over all those terms together, else the two means.

Departures: the authors draw, per training region, one synonym whose CLIP probability on the region crop is above
0.1 (``thresRand``, needs labelled regions); here the synonyms are used as given, all of them, at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CliplabError

MODES = ("mean", "max")


@dataclass(frozen=True)
class SynonymClassifier:
    """Text weights of every name (``name_weights`` (d, S), unit columns), the class of each name (``groups`` (S,)),
    the names, and ``weights`` (d, C): the mean of each class's name columns (GKC's ``clusterAvg`` as one matrix)."""

    class_names: list[str]
    names: list[str]
    groups: np.ndarray
    name_weights: np.ndarray
    weights: np.ndarray

    def logits(self, features, mode: str = "mean") -> torch.Tensor:
        """Class scores of (n, d) features (L2-normalised here): the mean (``clusterAvg``) or the max
        (``clusterMax``) over each class's names of the cosine to that name."""
        if mode not in MODES:
            raise CliplabError(f"synonym pooling must be one of {', '.join(MODES)}; got {mode!r}")
        features = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=-1)
        per_name = features @ torch.from_numpy(self.name_weights)
        return pool_synonym_scores(per_name, self.groups, len(self.class_names), mode)


def pool_synonym_scores(scores: torch.Tensor, groups, classes: int, mode: str = "mean") -> torch.Tensor:
    """(..., S) per-name scores -> (..., C) per-class scores: mean or max over the names of each class."""
    groups = torch.as_tensor(np.asarray(groups), dtype=torch.long)
    columns = []
    for c in range(classes):
        part = scores[..., groups == c]
        if part.shape[-1] == 0:
            raise CliplabError(f"class {c} has no name to score")
        columns.append(part.mean(-1) if mode == "mean" else part.amax(-1))
    return torch.stack(columns, dim=-1)


def class_names_with_synonyms(class_names: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None
                              ) -> list[list[str]]:
    """Each class's names: the class name first, then its synonyms (blank and repeated ones, case-insensitively,
    dropped)."""
    out = []
    for name in class_names:
        seen, names = {name.strip().lower()}, [name]
        for synonym in (synonyms or {}).get(name, []):
            key = synonym.strip().lower()
            if key and key not in seen:
                seen.add(key)
                names.append(synonym.strip())
        out.append(names)
    return out


def synonym_classifier(backbone, class_names: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None,
                       templates, cache_dir=None) -> SynonymClassifier:
    """The synonym-diversified classifier of ``class_names`` (see the module docstring); ``templates`` as
    :func:`cliplab.features.text.class_weights` takes them (a set name, a file or a list of ``{}`` templates)."""
    from ..features.text import class_weights

    per_class = class_names_with_synonyms(class_names, synonyms)
    unique = list(dict.fromkeys(n for names in per_class for n in names))
    embedded = class_weights(backbone, unique, templates, cache_dir=cache_dir)  # (d, U) unit columns
    column = {n: i for i, n in enumerate(unique)}
    names = [n for names in per_class for n in names]
    groups = np.asarray([c for c, names in enumerate(per_class) for _ in names], dtype=np.int64)
    name_weights = np.ascontiguousarray(embedded[:, [column[n] for n in names]], dtype=np.float32)
    weights = np.stack([name_weights[:, groups == c].mean(1) for c in range(len(per_class))], axis=1)
    return SynonymClassifier(list(class_names), names, groups, name_weights, weights.astype(np.float32))


def load_synonyms(class_names: Sequence[str], source=None, llm=None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``({class: [synonyms]}, LLM failures)`` from a JSON file / mapping or the LLM layer
    (``cliplab.data.synonyms.resolve_synonyms``)."""
    from ..data.synonyms import resolve_synonyms

    return resolve_synonyms(class_names, source, llm)


def text_guided_kd_loss(student: torch.Tensor, teacher: torch.Tensor, text: torch.Tensor, image_index,
                        scale: torch.Tensor | float = 1.0, separate: bool = False):
    """GKC's text-guided knowledge distillation (the authors' ``loss_text_kd``).

    ``student`` (N, d): the trained model's region embeddings; ``teacher`` (N, d): frozen CLIP's embeddings of the
    same regions (no gradient is taken through them); ``text`` (N, d): each region's class text embedding;
    ``image_index`` (N,): the image each region belongs to. Student, teacher and text are L2-normalised here.
    Returns ``mean([||v_i - c_i||^2]_i + [(s^2 t_i.t_j - v_i.c_j)^2]_{i, j same image})``, or with ``separate`` the
    pair (plain mean, text-guided mean)."""
    import torch.nn.functional as F

    v = F.normalize(student.float(), dim=-1)
    c = F.normalize(teacher.float().detach(), dim=-1)
    t = F.normalize(text.float(), dim=-1) * scale
    if not v.shape == c.shape == t.shape:
        raise CliplabError(f"student {tuple(v.shape)}, teacher {tuple(c.shape)} and text {tuple(t.shape)} differ")
    image_index = torch.as_tensor(np.asarray(image_index), dtype=torch.long)
    plain = ((v - c) ** 2).sum(-1)
    pairs = []
    for image in torch.unique(image_index, sorted=True):
        rows = image_index == image
        pairs.append(((t[rows] @ t[rows].T) - (v[rows] @ c[rows].T)).flatten() ** 2)
    guided = torch.cat(pairs)
    if separate:
        return plain.mean(), guided.mean()
    return torch.cat([guided, plain]).mean()
