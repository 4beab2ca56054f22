"""OOD evaluation: an ID test set against OOD sets, any registered scores on any head, OpenOOD's metrics, JSON and
ROC/histogram PNGs.

Scores are the plugins of :mod:`cliplab.ood` (``@register_score``). This module knows none by name: it reads
what each declares (``needs``) and gives exactly that (:class:`ScoreSet`): the head's logits, the image
features, the ID classes' text weights, patch grids, the ID train/val features (``fit_data``) or an artefact
folder. Whatever a chosen score needs that the evaluation cannot give is refused in one line before any image
is embedded. The head is any registered method (built and fitted on the ID train split, C or other
hyperparameters tuned on val) or a fitted head (``heads/saving.load_head``); the default is the zero-shot head
on ``templates``. The ID test set never reaches a fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..data import ImageDataset
from ..errors import CliplabError, FeatureError
from ..features import ImageFeatures, class_weights, embed_images
from ..heads.registry import head_entry
from ..ood import FPR_CONVENTIONS, ood_metrics
from ..ood.base import OODScore, ScoreContext, ScoreInputs
from ..ood.registry import create_score, list_scores, score_entry
from .inputs import FitInputs, build_head, fit_method, prepare_fit, test_features
from .naming import run_stem
from .plots import plot_ood_histograms, plot_ood_roc
from .results import results_record, write_json

DEFAULT_METHOD = "zeroshot"
FIT_DATA_HINT = ("it needs the ID dataset's train and val splits (pass fit_datasets, or use a named dataset / a "
                 "folder with train/ and val/)")


@dataclass
class OODPart:
    """One dataset of the evaluation (the ID test set or an OOD set) and its image features."""

    name: str
    dataset: ImageDataset
    features: ImageFeatures


# -- the head: built and fitted through the one provider (cliplab.eval.inputs) ------------------------------------
def head_is_fitted(head) -> bool:
    """Whether ``head`` is already fitted (scikit-learn's test: a public attribute ending in ``_``)."""
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(head)
    except NotFittedError:
        return False
    return True


def head_needs_fit_data(head) -> bool:
    """Whether ``head`` still has to be fitted on labelled ID data."""
    return not head_is_fitted(head) and head_entry(head).needs_train


def head_name(head) -> str:
    return head_entry(head).name


def resolve_head(head, backbone, dataset: ImageDataset, *, templates=None, params=None, cache_dir=None):
    """The evaluation's head: None is the zero-shot head on ``templates``; a method name is built by
    ``cliplab.eval.inputs.build_head`` (its declared default templates; ``params`` may name others); a head is
    used as given (fitted or not)."""
    if head is None:
        return build_head(DEFAULT_METHOD, backbone, list(dataset.class_names), dataset_name=dataset.name,
                          templates=templates, params=params, cache_dir=cache_dir)
    if isinstance(head, str):
        return build_head(head, backbone, list(dataset.class_names), dataset_name=dataset.name, params=params,
                          cache_dir=cache_dir)
    return head


def fit_ood_head(head, backbone, fit_datasets=None, *, cache_dir=None, batch_size: int = 64,
                 workers: int | None = None, progress: bool = False, shared: dict | None = None) -> FitInputs:
    """Fit ``head`` through the provider unless it is fitted: ``prepare_fit`` on the ID train split (every input
    the method declares) with the ID val split as its validation part where it declares "val"; a method that
    needs no data is fitted without. Returns the fit inputs (what its test features need, e.g. AMU's auxiliary
    model)."""
    entry = head_entry(head)
    if head_is_fitted(head):
        aux = head.get_params(deep=False).get("aux_model") if "aux_features" in entry.needs else None
        return FitInputs(aux_model=aux)
    if not entry.needs_train:
        fit_method(head, FitInputs())
        return FitInputs()
    train_data, val_data = fit_datasets
    shared = {} if shared is None else shared
    options = dict(cache_dir=cache_dir, batch_size=batch_size, workers=workers, progress=progress, shared=shared)
    inputs = prepare_fit(head, backbone, train_data, **options)
    if "val" in entry.needs and val_data is not None:
        inputs = replace(inputs, val=test_features(head, backbone, val_data, inputs, **options).labelled())
    fit_method(head, inputs)
    return inputs


def head_view(head, backbone, inputs: FitInputs, **options):
    """None where the head reads the plain image features; else ``(dataset, features) -> ImageFeatures`` giving
    the rows of ``features`` as the head reads them (through the Backbone it trained, with an auxiliary model's
    block appended: ``cliplab.eval.inputs.test_features``)."""
    if "backbone" not in head_entry(head).gives and not inputs.aux_model:
        return None

    def view(dataset: ImageDataset, features: ImageFeatures) -> ImageFeatures:
        return test_features(head, backbone, dataset, inputs, **options).take(features.item_ids)

    return view


# -- scores -----------------------------------------------------------------------------------------------------
def score_params(names: Sequence[str], params: Mapping[str, object] | None) -> dict[str, dict]:
    """Per chosen score, its parameters from ``params``: ``"key"`` goes to every chosen score that takes ``key``,
    ``"score.key"`` to that score only (and wins). A key no chosen score takes is an error."""
    takes = {name: {key for key, _ in score_entry(name).params} for name in names}
    out: dict[str, dict] = {name: {} for name in names}
    specific = {}
    for key, value in (params or {}).items():
        score, dot, param = key.rpartition(".")
        if dot:
            if score not in takes:
                raise CliplabError(f"score parameter {key!r}: {score!r} is not a chosen score ({', '.join(names)})")
            if param not in takes[score]:
                raise CliplabError(f"score parameter {key!r}: {score} takes "
                                   f"{', '.join(sorted(takes[score])) or 'no parameters'}")
            specific[(score, param)] = value
            continue
        users = [name for name in names if param in takes[name]]
        if not users:
            raise CliplabError(f"score parameter {key!r}: no chosen score takes it ({', '.join(names)})")
        for name in users:
            out[name][param] = value
    for (score, param), value in specific.items():
        out[score][param] = value
    return out


def dense_spec(scores: Mapping[str, OODScore]):
    """The one ``DenseSpec`` of the chosen scores that read patch grids (``OODScore.dense_spec``), or None."""
    from ..features.dense import DenseSpec

    wanted = {name: tuple(sorted(s.dense_spec().items())) for name, s in scores.items() if "patch_grids" in s.needs}
    if not wanted:
        return None
    if len(set(wanted.values())) > 1:
        raise CliplabError(f"the scores {', '.join(wanted)} read different patch grids ({wanted}); run them apart")
    return DenseSpec(**dict(next(iter(wanted.values()))))


def patch_grids(backbone, dataset: ImageDataset, features: ImageFeatures, spec, *, cache_dir=None,
                batch_size: int = 64, workers: int | None = None, progress: bool = False) -> np.ndarray:
    """Patch tokens (n, P, d), L2-normalised in the joint space, of the embedded items of ``dataset``
    (``features.indices``, in that order), read through the dense cache (``features.dense.embed_dense``: computed
    once, memory-mapped on every later run)."""
    from ..features.dense import embed_dense

    dense = embed_dense(backbone, dataset, cache_dir, spec=spec, batch_size=batch_size, num_workers=workers,
                        progress=progress)
    return dense.take(features.indices).tokens


@dataclass
class ScoreSet:
    """The chosen scores of one evaluation, built, checked and set up before any image is embedded.

    ``inputs(part)`` gives each dataset what the scores declared (logits only if one reads them, patch grids only
    if one reads them); ``run(inputs)`` scores it with every chosen score.
    """

    scores: dict[str, OODScore]
    context: ScoreContext
    head: object | None = None
    batch_size: int = 64
    workers: int | None = None
    progress: bool = False
    dense: object = None  # the DenseSpec of the patch grids, when a score reads them
    view: object = None  # (dataset, features) -> the head's own features of those rows (see head_view), or None
    memo: dict = field(default_factory=dict)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(s.needs for s in self.scores.values()))

    def params(self) -> dict[str, dict]:
        return {name: score.get_params() for name, score in self.scores.items()}

    def fit(self, train: ImageFeatures, val: ImageFeatures) -> None:
        """Fit the scores that declared ``fit_data`` on the ID train and val features."""
        for score in self.scores.values():
            if "fit_data" in score.needs:
                score.fit(train, val)

    def bind_head(self, head, view=None) -> None:
        """Use the fitted ``head``; where a score reads text weights they are the head's class weights if it
        declares them (``gives=("class_weights",)``: the zero-shot head's prompt weights), else the ID classes'
        prompt-ensembled weights of the evaluation's templates."""
        self.head, self.view = head, view
        if "text_weights" in self.needs:
            context = self.context
            if "class_weights" in head_entry(head).gives:
                context.text_weights, self.memo["text_weights"] = np.asarray(head.weights_), "head"
            else:
                context.text_weights = class_weights(context.backbone, context.class_names, context.templates,
                                                     cache_dir=context.cache_dir)
                self.memo["text_weights"] = "templates"

    def logits(self, name: str, dataset: ImageDataset, features: ImageFeatures) -> np.ndarray:
        """The head's logits (n, C) of the rows of ``features`` (memoised per dataset name)."""
        key = ("logits", name)
        if key not in self.memo:
            rows = features if self.view is None else self.view(dataset, features)
            self.memo[key] = np.asarray(self.head.logits(rows.features))
        return self.memo[key]

    def inputs(self, name: str, dataset: ImageDataset, features: ImageFeatures) -> ScoreInputs:
        needs = self.needs
        return ScoreInputs(
            name, np.asarray(features.features),
            logits=self.logits(name, dataset, features) if "logits" in needs else None,
            local_features=(patch_grids(self.context.backbone, dataset, features, self.dense,
                                        cache_dir=self.context.cache_dir, batch_size=self.batch_size,
                                        workers=self.workers, progress=self.progress)
                            if "patch_grids" in needs else None))

    def run(self, inputs: ScoreInputs) -> dict[str, np.ndarray]:
        return {name: np.asarray(score.score(inputs), dtype=np.float64) for name, score in self.scores.items()}


def build_scores(names: Sequence[str], backbone, class_names: Sequence[str], *, templates=None,
                 params: Mapping[str, object] | None = None, head=None, artefact=None, fit_data: bool = False,
                 cache_dir=None, batch_size: int = 64, workers: int | None = None, progress: bool = False) -> ScoreSet:
    """Build the scores ``names`` with ``params`` (see :func:`score_params`) and check that this evaluation gives
    what each declared: logits need ``head``, ``fit_data`` needs the ID train/val splits (``fit_data=True``),
    ``artefact`` a folder, ``patch_grids`` a model whose image tower gives the patch tokens the score asks for
    (``dense_spec``). Each refusal is one line naming the score; nothing has been embedded yet. Then ``setup``
    every score. Call ``bind_head`` with the fitted head before scoring."""
    names = list(dict.fromkeys(names))
    if not names:
        raise CliplabError("give at least one OOD score")
    known = [e.name for e in list_scores()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CliplabError(f"unknown OOD score {unknown[0]!r}; known: {', '.join(known)}")
    per_score = score_params(names, params)
    scores = {name: create_score(name, **per_score[name]) for name in names}
    for name, score in scores.items():
        needs = score.needs
        if ("logits" in needs or "head" in needs) and head is None:
            raise CliplabError(f"OOD score {name!r} reads a head's logits: give a method or a fitted head")
        if "fit_data" in needs and not fit_data:
            raise CliplabError(f"OOD score {name!r} fits on the ID data: {FIT_DATA_HINT}")
        if "artefact" in needs and artefact is None:
            what = score.artefact_help or "the folder it reads"
            raise CliplabError(f"OOD score {name!r} needs an artefact ({what}): pass --artefact FOLDER")
    spec = dense_spec(scores)
    if spec is not None:  # the model's image tower tells whether it has these patch tokens; no image needed
        from ..features.dense import dense_cache_key

        dense_cache_key(backbone, spec)
    context = ScoreContext(backbone, list(class_names), templates, None, artefact, cache_dir, head=head)
    for score in scores.values():
        score.setup(context)
    return ScoreSet(scores, context, head, batch_size, workers, progress, spec)


# -- the evaluation ---------------------------------------------------------------------------------------------
@dataclass
class OODReport:
    record: dict
    scores: dict[str, dict[str, np.ndarray]]  # score -> part name -> scores
    files: dict[str, Path]


def evaluate_ood(backbone, id_dataset: ImageDataset, ood_datasets: Sequence[ImageDataset], scores: Sequence[str],
                 templates, output_dir: Path | None = None, *, head=None, head_params: Mapping | None = None,
                 params: Mapping[str, object] | None = None, fpr_convention: str = "id-positive",
                 cache_dir: Path | None = None, batch_size: int = 64, workers: int | None = None,
                 progress: bool = False, fit_datasets: tuple[ImageDataset, ImageDataset] | None = None,
                 artefact=None) -> OODReport:
    """Per score x OOD set: AUROC, FPR@95 (``fpr_convention``), AUPR-in/out (:func:`cliplab.ood.ood_metrics`), plus
    the head's ID accuracy. Writes ``<stem>.json`` (atomically), ``<stem>_roc.png`` and ``<stem>_hist.png`` to
    ``output_dir`` when given, ``<stem>`` = ``ood_<method>_<ID dataset>_<split>_<model>_<settings hash>``
    (:func:`cliplab.eval.naming.run_stem`: another run never overwrites this one).

    ``head``: None (the zero-shot head on ``templates``), a registered method name (built with ``head_params``,
    templates its own default unless ``head_params`` has them; fitted on ``fit_datasets`` when it needs data) or
    a head, fitted or not. ``templates`` are also the text of the scores that read class text weights.
    ``params``: score parameters, ``"key"`` for every chosen score that takes it or ``"score.key"``.
    ``fit_datasets`` (ID train, ID val) feed the head and the scores that declare ``fit_data``; ``artefact`` (a
    folder or a loaded object) the scores that declare ``artefact``."""
    if fpr_convention not in FPR_CONVENTIONS:
        raise CliplabError(f"unknown FPR convention {fpr_convention!r}; known: {', '.join(FPR_CONVENTIONS)}")
    if not ood_datasets:
        raise CliplabError("give at least one OOD dataset")
    class_names = list(id_dataset.class_names)
    if not class_names:
        raise CliplabError(f"{id_dataset.name}: the ID dataset has no class names")
    head = resolve_head(head, backbone, id_dataset, templates=templates, params=head_params, cache_dir=cache_dir)
    head_fits = head_needs_fit_data(head)
    if head_fits and fit_datasets is None:
        raise CliplabError(f"method {head_name(head)!r} fits on the ID train split: {FIT_DATA_HINT}")
    score_set = build_scores(scores, backbone, class_names, templates=templates, params=params, head=head,
                             artefact=artefact, fit_data=fit_datasets is not None, cache_dir=cache_dir,
                             batch_size=batch_size, workers=workers, progress=progress)
    options = dict(cache_dir=cache_dir, batch_size=batch_size, workers=workers, progress=progress, shared={})

    def part(dataset: ImageDataset, name: str) -> OODPart:
        features = embed_images(backbone, dataset, cache_dir, batch_size=batch_size, num_workers=workers,
                                progress=progress)
        if not len(features):
            raise FeatureError(f"{name}: no image could be embedded")
        return OODPart(name, dataset, features)

    fit_data = None
    if head_fits or "fit_data" in score_set.needs:
        fit_data = tuple(part(d, f"{d.name} ({d.split})").features.labelled() for d in fit_datasets)
    id_part = part(id_dataset, id_dataset.name)
    if fit_data is not None:
        test_ids = set(id_part.features.item_ids)
        shared = [i for f in fit_data for i in f.item_ids if i in test_ids]
        if shared:
            raise CliplabError(f"the ID fit data (train/val) shares {len(shared)} images with the ID test set, "
                               f"e.g. {shared[0]}")
    inputs = fit_ood_head(head, backbone, fit_datasets, **options)
    score_set.bind_head(head, head_view(head, backbone, inputs, **options))
    if "fit_data" in score_set.needs:
        score_set.fit(*fit_data)
    ood_parts, seen = [], {id_part.name}
    for dataset in ood_datasets:
        name = dataset.name
        while name in seen:
            name += "'"
        seen.add(name)
        ood_parts.append(part(dataset, name))

    id_accuracy = accuracy(head, score_set.logits(id_part.name, id_dataset, id_part.features),
                           id_part.features.labels)
    values: dict[str, dict[str, np.ndarray]] = {name: {} for name in score_set.scores}
    for p in (id_part, *ood_parts):
        for name, v in score_set.run(score_set.inputs(p.name, p.dataset, p.features)).items():
            values[name][p.name] = v
    results = {name: {p.name: ood_metrics(values[name][id_part.name], values[name][p.name], fpr_convention)
                      for p in ood_parts} for name in score_set.scores}
    open_set = open_set_results(head, score_set, values, id_part, ood_parts)
    record = results_record(
        dataset=id_part.name, model=id_part.features.model, task="ood_detection",
        metrics={"id_accuracy": id_accuracy, "ood": results, **({"open_set": open_set} if open_set else {})},
        extra={"fpr95_convention": fpr_convention, "scores": list(score_set.scores), "score_params": score_set.params(),
               "method": head_name(head), "head_params": _head_params(head),
               "text_weights": score_set.memo.get("text_weights"),
               "ood_datasets": [p.name for p in ood_parts], "id_split": id_dataset.split,
               "n_id": len(id_part.features), "templates": templates if isinstance(templates, str) else "custom",
               "fit_splits": None if fit_data is None else [f"{d.name} ({d.split})" for d in fit_datasets],
               "failures": {p.name: p.features.failures for p in (id_part, *ood_parts) if p.features.failures}})
    files: dict[str, Path] = {}
    if output_dir is not None:
        output_dir = Path(output_dir)
        title = f"{id_part.name} vs OOD · {id_part.features.model_id}"
        stem = run_stem("ood", record, method=head_name(head), dataset=id_part.name, split=id_dataset.split,
                        keys=[p.features.cache_key for p in (id_part, *ood_parts)])
        files["json"] = write_json(record, output_dir / f"{stem}.json")
        files["roc"] = plot_ood_roc(values, id_part.name, output_dir / f"{stem}_roc.png", title)
        files["histogram"] = plot_ood_histograms(values, id_part.name, output_dir / f"{stem}_hist.png", title)
    return OODReport(record, values, files)


def open_set_results(head, score_set: ScoreSet, values: dict, id_part: OODPart, ood_parts: list[OODPart]) -> dict:
    """Per score with its own decision (``OODScore.threshold``) x OOD set: known accuracy (ID accepted and right),
    unknown accuracy (OOD rejected) and H-score (:func:`cliplab.ood.metrics.open_set_metrics`)."""
    from ..ood.metrics import open_set_metrics

    decided = {name: s.threshold for name, s in score_set.scores.items() if s.threshold is not None}
    if not decided:
        return {}
    logits = score_set.logits(id_part.name, id_part.dataset, id_part.features)
    predictions = np.asarray(getattr(head, "classes_", np.arange(logits.shape[1])))[logits.argmax(axis=1)]
    labels = id_part.features.labels
    return {name: {p.name: open_set_metrics(predictions, labels, values[name][id_part.name], values[name][p.name],
                                            threshold) for p in ood_parts} for name, threshold in decided.items()}


def accuracy(head, logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of ``logits`` (columns = ``head.classes_``, class indices) against ``labels``."""
    classes = np.asarray(getattr(head, "classes_", np.arange(logits.shape[1])))
    return float(np.mean(classes[logits.argmax(axis=1)] == labels))


def _head_params(head) -> dict:
    from .evaluate import head_params

    return head_params(head)
