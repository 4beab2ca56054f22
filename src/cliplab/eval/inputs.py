"""One provider of what a method needs, for every caller (evaluate, fewshot, classify, explain, ood, robustness,
the service): the head built with its declared template default, and its fit inputs built from a train split.

What a method needs is declared at its registration (``heads/registry.py``: ``needs``, ``default_templates``,
``gives``); nothing here reads signatures or attribute names.

- :func:`build_head`: an unfitted head; ``templates=None`` means the method's declared default everywhere
  ("dataset": the dataset's CLIP_benchmark set, else imagenet7, also without a dataset).
- :func:`prepare_fit`: the labelled train features, the few-shot draw (``shots`` + ``seed``) or a saved split
  file, its validation part, and every declared extra input: augmented ``views`` of the shots, their
  ``caption_features``, a second model's features appended column-wise ("aux_features", AMU's ``aux_model``),
  the training ``images`` (a dataset aligned with the rows, for heads that train through the encoders), the
  ``unlabelled`` rest of the split outside the draw, labels removed (pseudolabel methods; with "images" also
  their ``unlabelled_images``).
- :func:`test_features`: the test split's features as the fitted head reads them: through the head's derived
  Backbone (``gives=("backbone",)``: its ``backbone_``, cached under its own model id), with the auxiliary block
  appended where the fit had one.
- :func:`run_method`: build, prepare, fit, embed the test split and ``evaluate`` (what ``cliplab evaluate`` runs).

Callers that run many methods on one split pass the same ``shared`` dict to each call, so train features, draws,
views, captions and auxiliary features are computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data.base import ImageDataset, Subset
from ..errors import CliplabError, DatasetError
from ..features.embed import embed_images
from ..features.text import embed_texts
from ..features.values import FewShotSplit, ImageFeatures
from ..features.views import DEFAULT_VIEWS, Augmentation, AugmentedViews, stack_views
from ..heads.registry import DATASET_TEMPLATES, create_head, head_entry
from ..models.backbone import Backbone

VIEW_SEED = 0  # one set of augmented views per image, shared by every seed and shot count (and cached)
FALLBACK_TEMPLATES = "imagenet7"  # "dataset" templates where the dataset has no CLIP_benchmark set (or no dataset)

Embed = Callable[[Backbone, ImageDataset], ImageFeatures]


@dataclass
class FitInputs:
    """What ``fit`` gets: training rows, the validation part, extra inputs by name, the split file used, and the
    auxiliary model whose features the test rows need too (None: plain features)."""

    train: ImageFeatures | None = None
    val: ImageFeatures | None = None
    fit_params: dict = field(default_factory=dict)
    split_file: Path | None = None
    aux_model: str | None = None


def dataset_templates(dataset_name: str | None) -> str:
    """The template set of a dataset: its CLIP_benchmark set where there is one, else imagenet7."""
    from ..data import template_sets

    return dataset_name if dataset_name and dataset_name in template_sets() else FALLBACK_TEMPLATES


def resolve_templates(method, templates=None, dataset_name: str | None = None):
    """What ``templates`` the method gets: the given ones, else its declared default (None: it takes none)."""
    entry = head_entry(method)
    if not entry.takes_templates:
        return None
    if templates is not None:
        return templates
    default = entry.default_templates
    if default == DATASET_TEMPLATES:
        return dataset_templates(dataset_name)
    if default == ():
        return None  # the head's own "no templates" (CuPL: its sentences alone)
    return default


def build_head(method: str, backbone: Backbone | None, class_names, *, dataset_name: str | None = None,
               templates=None, params: dict | None = None, cache_dir=None):
    """The unfitted head ``method`` for ``class_names``; ``templates=None`` (and no ``templates`` in ``params``)
    means the method's declared default; a method that takes no templates ignores them."""
    entry = head_entry(method)
    kwargs = dict(params or {})
    if entry.takes_templates:
        given = templates if templates is not None else kwargs.pop("templates", None)
        kwargs["templates"] = resolve_templates(entry.name, given, dataset_name)
    if entry.needs_backbone:
        kwargs.setdefault("cache_dir", cache_dir)
    return create_head(entry.name, backbone=backbone, class_names=class_names, **kwargs)


def for_single_images(head):
    """``head`` with its declared ``per_image`` parameters: one image's logits do not depend on the other images
    scored with it (``cliplab classify``, the service)."""
    entry = head_entry(head)
    return head.set_params(**entry.per_image) if entry.per_image else head


def _memo(shared: dict, key, compute):
    if key not in shared:
        shared[key] = compute()
    return shared[key]


def _embedder(embed: Embed | None, cache_dir, batch_size: int, workers: int | None, progress: bool) -> Embed:
    if embed is not None:
        return embed
    return lambda backbone, data: embed_images(backbone, data, cache_dir, batch_size=batch_size,
                                               num_workers=workers, progress=progress)


def train_split(backbone: Backbone, train_data: ImageDataset, *, shots: int | None = None,
                split_file: str | Path | None = None, seed: int = 0, save_as: str | Path | None = None,
                cache_dir=None, batch_size: int = 64, workers: int | None = None, progress: bool = True,
                embed: Embed | None = None, shared: dict | None = None
                ) -> tuple[ImageFeatures, FewShotSplit | None, Path | None]:
    """The labelled train features, the draw (``shots`` per class with ``seed``, saved to ``save_as``) or the saved
    ``split_file`` applied to them (None: the whole split), and the split file's path."""
    if shots is not None and split_file is not None:
        raise CliplabError("give either shots (a seeded draw) or a split file, not both")
    shared = {} if shared is None else shared
    embed = _embedder(embed, cache_dir, batch_size, workers, progress)
    source = (backbone.model_id, id(train_data))
    train = _memo(shared, ("train", *source), lambda: embed(backbone, train_data).labelled())
    if split_file is not None:
        drawn = _memo(shared, ("split-file", *source, str(split_file)), lambda: train.apply_split(split_file))
        return train, drawn, Path(split_file)
    if shots is None:
        return train, None, None
    drawn = _memo(shared, ("draw", *source, shots, seed), lambda: train.few_shot(shots, seed=seed))
    path = None
    if save_as is not None:
        path = _memo(shared, ("saved", shots, seed, str(save_as)), lambda: drawn.save(save_as))
    return train, drawn, path


def prepare_fit(head, backbone: Backbone, train_data: ImageDataset | None = None, *, shots: int | None = None,
                split_file: str | Path | None = None, seed: int = 0, output_dir: str | Path | None = None,
                cache_dir=None, batch_size: int = 64, workers: int | None = None, progress: bool = True,
                views: int = DEFAULT_VIEWS, save_split_as: str | Path | None = None, embed: Embed | None = None,
                shared: dict | None = None) -> FitInputs:
    """The fit inputs ``head`` declares, from ``train_data`` (its train split).

    Without ``shots`` or ``split_file`` the head fits on the whole split (no validation part, no views). With
    ``shots`` the draw is saved to ``save_split_as``, else to ``output_dir/split_<dataset>_<k>shot_seed<s>.json``
    when ``output_dir`` is given. A head that needs no training data gets nothing."""
    entry = head_entry(head)
    if not entry.needs_train:
        return FitInputs()
    if train_data is None:
        raise CliplabError(f"method {entry.name!r} needs training data (a train split)")
    shared = {} if shared is None else shared
    aux_model = head.get_params(deep=False).get("aux_model") if "aux_features" in entry.needs else None
    if "aux_features" in entry.needs and not aux_model:
        raise CliplabError(f"method {entry.name!r} needs auxiliary-model features: give its aux_model parameter "
                           "(a model name, e.g. aux_model=tiny)")
    if shots is not None and save_split_as is None and output_dir is not None:
        save_split_as = Path(output_dir) / f"split_{train_data.name}_{shots}shot_seed{seed}.json"
    embed = _embedder(embed, cache_dir, batch_size, workers, progress)
    train, drawn, split_path = train_split(backbone, train_data, shots=shots, split_file=split_file, seed=seed,
                                           save_as=save_split_as, embed=embed, shared=shared)
    fit_train, val = (drawn.train, drawn.val) if drawn is not None else (train, None)
    fit_params: dict = {}
    key = (id(train_data), str(split_file) if split_file is not None else (shots, seed))
    if drawn is not None and "views" in entry.needs and not aux_model:  # views are of the CLIP model only
        fit_params["views"] = _memo(shared, ("views", key, views), lambda: shot_views(
            backbone, train_data, drawn, views, cache_dir, batch_size, workers, progress))
    if drawn is not None and "caption_features" in entry.needs:
        fit_params["caption_features"] = _memo(shared, ("captions", key), lambda: caption_features(
            backbone, train_data, drawn, cache_dir))
    if aux_model:
        aux = _aux_backbone(aux_model, backbone, shared)
        aux_train = _memo(shared, ("aux-train", aux_model, id(train_data)),
                          lambda: with_aux(train, embed(aux, train_data).labelled()))
        if drawn is not None:
            aux_split = aux_train.apply_split(drawn.record)
            fit_train, val = aux_split.train, aux_split.val
        else:
            fit_train = aux_train
    if "images" in entry.needs:
        fit_params["images"] = Subset(train_data, np.asarray(fit_train.indices))
    if "unlabelled" in entry.needs and drawn is not None and not aux_model:
        drawn_rows = np.concatenate([fit_train.indices] + ([val.indices] if val is not None else []))
        rest = train.subset(~np.isin(train.indices, drawn_rows))
        fit_params["unlabelled"] = replace(rest, labels=np.full(len(rest.labels), -1))  # their labels never go in
        if "images" in entry.needs:
            fit_params["unlabelled_images"] = Subset(train_data, np.asarray(rest.indices))
    return FitInputs(fit_train, val, fit_params, split_path, aux_model)


def _aux_backbone(name: str, backbone: Backbone, shared: dict) -> Backbone:
    from ..models import load_model

    return _memo(shared, ("aux-model", name), lambda: load_model(name, device=str(backbone.device)))


def fit_method(head, inputs: FitInputs):
    """Fit ``head`` on ``inputs`` (see ``eval.evaluate.fit_head``); returns the head."""
    from .evaluate import fit_head

    return fit_head(head, inputs.train, inputs.val, **inputs.fit_params)


def test_features(head, backbone: Backbone, test_data: ImageDataset, inputs: FitInputs | None = None, *,
                  cache_dir=None, batch_size: int = 64, workers: int | None = None, progress: bool = True,
                  embed: Embed | None = None, shared: dict | None = None) -> ImageFeatures:
    """``test_data``'s features as the (fitted, where it gives a Backbone) head reads them: through its
    ``backbone_`` for heads that give one (cached under that model's id), else ``backbone``; with the auxiliary
    model's block appended when ``inputs`` has one."""
    entry = head_entry(head)
    shared = {} if shared is None else shared
    embed = _embedder(embed, cache_dir, batch_size, workers, progress)
    source = backbone
    if "backbone" in entry.gives:
        source = getattr(head, "backbone_", None)
        if source is None:
            raise CliplabError(f"method {entry.name!r}: fit it before embedding the test images (its features come "
                               "from the Backbone it trains)")
    test = _memo(shared, ("test", source.model_id, id(test_data)), lambda: embed(source, test_data))
    if inputs is not None and inputs.aux_model:
        aux = _aux_backbone(inputs.aux_model, backbone, shared)
        test = _memo(shared, ("aux-test", inputs.aux_model, id(test_data)),
                     lambda: with_aux(test, embed(aux, test_data)))
    return test


test_features.__test__ = False  # a pytest module importing it must not collect it as a test


@dataclass
class MethodRun:
    """One method run by :func:`run_method`: its report, the fitted head and what it was fitted on."""

    report: object
    head: object
    inputs: FitInputs
    test: ImageFeatures


def run_method(method: str, backbone: Backbone, test_data: ImageDataset, train_data: ImageDataset | None = None, *,
               templates=None, params: dict | None = None, shots: int | None = None,
               split_file: str | Path | None = None, seed: int = 0, output_dir: str | Path | None = "results",
               cache_dir=None, batch_size: int = 64, workers: int | None = None, progress: bool = True,
               views: int = DEFAULT_VIEWS, save_split_as: str | Path | None = None, embed: Embed | None = None,
               shared: dict | None = None, report_shots: int | None = None) -> MethodRun:
    """Build ``method`` for ``test_data``'s classes, fit it as it declares on ``train_data`` (the whole split, a
    seeded draw of ``shots`` per class, or ``split_file``), embed the test split and ``evaluate``.

    The head is built (and bad parameters refused) before anything is embedded; the test split never reaches
    fitting. ``report_shots`` is the shot count recorded (default ``shots``)."""
    from .evaluate import evaluate

    if test_data.split == "train":
        raise CliplabError("the test split must not be the training split")
    shared = {} if shared is None else shared
    head = build_head(method, backbone, test_data.class_names, dataset_name=test_data.name, templates=templates,
                      params=params, cache_dir=cache_dir)
    options = {"cache_dir": cache_dir, "batch_size": batch_size, "workers": workers, "progress": progress,
               "embed": embed, "shared": shared}
    inputs = prepare_fit(head, backbone, train_data, shots=shots, split_file=split_file, seed=seed,
                         output_dir=output_dir, views=views, save_split_as=save_split_as, **options)
    recorded = shots if report_shots is None else report_shots
    common = {"output_dir": output_dir, "seed": seed, "shots": recorded, "split_file": inputs.split_file}
    if "backbone" in head_entry(head).gives:  # its test features come from what fit trains
        fit_method(head, inputs)
        test = test_features(head, backbone, test_data, inputs, **options)
        report = evaluate(head, test, inputs.train, val=inputs.val, fitted=True, **common)
    else:
        test = test_features(head, backbone, test_data, inputs, **options)
        report = evaluate(head, test, inputs.train, val=inputs.val, fit_params=inputs.fit_params, **common)
    return MethodRun(report, head, inputs, test)


def shot_views(backbone: Backbone, train: ImageDataset, split: FewShotSplit, views: int, cache_dir,
               batch_size: int, workers: int | None, progress: bool) -> np.ndarray:
    """(views, n, d) augmented-view features of the shot items, rows aligned with ``split.train``."""
    subset = Subset(train, split.train.indices)
    augmented = AugmentedViews(subset, views, seed=VIEW_SEED, augmentation=Augmentation(size=image_size(backbone)))
    feats = embed_images(backbone, augmented, cache_dir, batch_size=batch_size, num_workers=workers,
                         progress=progress)
    if feats.failures:
        raise DatasetError(f"{len(feats.failures)} augmented view(s) failed to decode: {feats.failures[0]}")
    return stack_views(feats, views)


def image_size(backbone: Backbone) -> int:
    """The model's input side in pixels (augmented views are cropped to it)."""
    size = backbone.preprocess_config.get("size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def caption_features(backbone: Backbone, train: ImageDataset, split: FewShotSplit, cache_dir) -> np.ndarray | None:
    """Text embeddings of the first caption of each shot item, when the dataset has captions."""
    captions = getattr(train, "captions", None)
    base = getattr(train, "dataset", None)
    if captions is None and base is not None:  # a Subset (e.g. train less the held-out val) of a captioned set
        captions = getattr(base, "captions", None)
        indices = getattr(train, "indices", None)
        if captions is not None and indices is not None:
            captions = [captions[int(i)] for i in indices]
    if not captions:
        return None
    texts = [captions[int(i)][0] if captions[int(i)] else "" for i in split.train.indices]
    if not all(texts):
        return None
    return embed_texts(backbone, texts, cache_dir)


def with_aux(features: ImageFeatures, aux: ImageFeatures) -> ImageFeatures:
    """``features`` with ``aux``'s features of the same items appended column-wise (items in both only)."""
    position = {item: i for i, item in enumerate(aux.item_ids)}
    keep = [i for i, item in enumerate(features.item_ids) if item in position]
    rows = features.subset(keep)
    extra = np.asarray(aux.features)[[position[features.item_ids[i]] for i in keep]]
    return replace(rows, features=np.hstack([np.asarray(rows.features), extra]).astype(np.float32),
                   failures=features.failures + [f for f in aux.failures if f not in features.failures],
                   model_id=f"{features.model_id}+aux:{aux.model_id}")
