"""Concept-association bias (paper 25, "When are Lemons Purple?").

CLIP treats an image as a bag of concepts: asked for an attribute of one object, it may answer with the attribute of
another object in the image (a lemon beside an eggplant is "purple"). The probe here: composite images of an
*object* (a real image filling the canvas) and a *distractor* (another real image of another class, resized to a
``size`` fraction of the side and pasted into a seeded corner), scored against prompts that name only attributes.

- ``attribute="class"``: the attribute is the object's class (what a model trained on class-name captions knows);
  prompts are the templates filled with the class names.
- ``attribute="colour"``: object and distractor are recoloured (their luminance times a colour of ``COLOURS``,
  two different colours), and the prompts name colours (``COLOUR_TEMPLATES``); ``name_object=True`` names the
  object's class in them as the paper's "the color of the lemon is ..." (``OBJECT_COLOUR_TEMPLATES``).

Each probe is also scored with the object alone (no distractor, same recolouring). The model *knows* a probe when the
object alone gets its own attribute; CAB is the rate at which the distractor's attribute wins on the composites of
the known probes. With no distractor (``size=0``) the composite is the object alone, so CAB is 0. Reported beside
it: the rate the object's attribute survives, the rate the distractor's attribute wins over all probes and, as a
chance baseline, over the objects alone.

Departures: the paper uses photographs of fruit and vegetables side by side and measures colour-association
strength with ConceptNet; here composites are built from any labelled dataset (CIFAR-10 by default) and the
association is the one the probe creates. No public code was used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.base import NO_LABEL, ImageDataset, has_labels
from ..errors import CliplabError, DatasetError
from .registry import register_analysis

VERSION = 1  # of the composites' pixels: part of every probe's cache identity
ATTRIBUTES = ("class", "colour")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 85, 215), "yellow": (235, 205, 40),
           "purple": (125, 50, 165), "orange": (240, 135, 30)}
COLOUR_TEMPLATES = ("a photo of something {c}.", "a {c} thing.", "the colour is {c}.")
OBJECT_COLOUR_TEMPLATES = ("a photo of a {c} {o}.", "the colour of the {o} is {c}.", "a {c} {o}.")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


@dataclass(frozen=True)
class Probes:
    """Seeded probes: dataset indices of each object and distractor, the corner, and both attributes (indices into
    the attribute names; colours also index ``COLOURS`` for the recolouring)."""

    objects: np.ndarray
    distractors: np.ndarray
    corners: np.ndarray
    object_attr: np.ndarray
    distractor_attr: np.ndarray
    attribute: str

    def __len__(self) -> int:
        return len(self.objects)


def draw_probes(labels: Sequence[int], count: int, seed: int = 0, attribute: str = "class") -> Probes:
    """``count`` probes drawn with ``numpy.random.default_rng(seed)``: objects without replacement (with it when
    ``count`` exceeds the labelled items), each distractor an item of another class; for colours, two different
    colours per probe."""
    if attribute not in ATTRIBUTES:
        raise CliplabError(f"attribute {attribute!r}: use one of {', '.join(ATTRIBUTES)}")
    labels = np.asarray(labels)
    labelled = np.flatnonzero(labels != NO_LABEL)
    if count < 1:
        raise CliplabError(f"the number of probes must be at least 1, got {count}")
    if len(np.unique(labels[labelled])) < 2:
        raise DatasetError("a concept-association probe needs labelled images of at least 2 classes")
    rng = np.random.default_rng(seed)
    objects = rng.choice(labelled, size=count, replace=count > len(labelled))
    distractors = np.empty(count, dtype=np.int64)
    for i, obj in enumerate(objects):
        others = labelled[labels[labelled] != labels[obj]]
        distractors[i] = others[rng.integers(len(others))]
    corners = rng.integers(0, len(CORNERS), size=count)
    if attribute == "class":
        object_attr, distractor_attr = labels[objects], labels[distractors]
    else:
        object_attr = rng.integers(0, len(COLOURS), size=count)
        distractor_attr = (object_attr + rng.integers(1, len(COLOURS), size=count)) % len(COLOURS)
    return Probes(np.asarray(objects, dtype=np.int64), distractors, corners, np.asarray(object_attr, dtype=np.int64),
                  np.asarray(distractor_attr, dtype=np.int64), attribute)


def recolour(image: Image.Image, rgb: Sequence[int]) -> Image.Image:
    """The image's luminance (PIL's ITU-R 601 "L") times the colour ``rgb``."""
    luminance = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    return Image.fromarray(np.round(luminance[..., None] * np.asarray(rgb, dtype=np.float64)).astype(np.uint8))


def compose(obj: Image.Image, distractor: Image.Image | None, size: float, corner: int) -> Image.Image:
    """``obj`` with ``distractor`` resized to ``round(size * side)`` square (bicubic) pasted into ``CORNERS[corner]``;
    ``obj`` itself (a copy) when that is 0 pixels or there is no distractor."""
    canvas = obj.convert("RGB").copy()
    side = int(round(size * min(canvas.size)))
    if distractor is None or side < 1:
        return canvas
    patch = distractor.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    width, height = canvas.size
    left = 0 if corner in (0, 2) else width - side
    top = 0 if corner in (0, 1) else height - side
    canvas.paste(patch, (left, top))
    return canvas


class CompositeDataset(ImageDataset):
    """The probes' images: composites (``size`` > 0) or the objects alone (``size=0``), recoloured for colour
    probes; labels are the objects' attributes, class names the attribute names."""

    def __init__(self, base: ImageDataset, probes: Probes, size: float, attribute_names: Sequence[str]):
        if not 0 <= size < 1:
            raise CliplabError(f"the distractor size is a fraction of the side in [0, 1), got {size}")
        self.base, self.probes, self.size = base, probes, float(size)
        self.labels = probes.object_attr.copy()
        self.class_names = list(attribute_names)
        self.name = f"{base.name}-cab"
        self.split, self.split_info = base.split, base.split_info

    def _colours(self, index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
        if self.probes.attribute != "colour":
            return None
        palette = list(COLOURS.values())
        return palette[self.probes.object_attr[index]], palette[self.probes.distractor_attr[index]]

    def _solo(self) -> bool:
        return self.size == 0

    def item_id(self, index: int) -> str:
        obj = self.base.item_id(int(self.probes.objects[index]))
        if self._solo():
            return f"probe{index}:{obj}"
        return f"probe{index}:{obj}+{self.base.item_id(int(self.probes.distractors[index]))}"

    def identity(self, index: int) -> str:
        colours = self._colours(index)
        obj = self.base.identity(int(self.probes.objects[index]))
        tint = "" if colours is None else f"|tint{colours[0]}"
        if self._solo():
            return f"cab-v{VERSION}|solo{tint}|{obj}"
        tint += "" if colours is None else f"/{colours[1]}"
        return (f"cab-v{VERSION}|size{self.size!r}|{CORNERS[int(self.probes.corners[index])]}{tint}|{obj}|"
                f"{self.base.identity(int(self.probes.distractors[index]))}")

    def load_image(self, index: int) -> Image.Image:
        obj = self.base.load_image(int(self.probes.objects[index]))
        distractor = None if self._solo() else self.base.load_image(int(self.probes.distractors[index]))
        colours = self._colours(index)
        if colours is not None:
            obj = recolour(obj, colours[0])
            distractor = None if distractor is None else recolour(distractor, colours[1])
        return compose(obj, distractor, self.size, int(self.probes.corners[index]))


def cab_summary(object_pred, composite_pred, object_attr, distractor_attr) -> dict:
    """CAB and its companions from predicted attributes (indices) of the objects alone and of the composites.

    ``cab``: among the known probes (object alone predicted right), the rate the distractor's attribute wins on the
    composite (None without known probes); ``kept``: the rate the object's attribute still wins there;
    ``distractor_rate``: the distractor's attribute winning over all composites; ``solo_distractor_rate``: the same
    over the objects alone (chance: no distractor is in those images)."""
    object_pred, composite_pred = np.asarray(object_pred), np.asarray(composite_pred)
    object_attr, distractor_attr = np.asarray(object_attr), np.asarray(distractor_attr)
    known = object_pred == object_attr
    n_known = int(known.sum())
    return {
        "probes": int(len(object_pred)),
        "known": n_known,
        "known_rate": float(known.mean()) if len(known) else None,
        "cab": float((composite_pred[known] == distractor_attr[known]).mean()) if n_known else None,
        "kept": float((composite_pred[known] == object_attr[known]).mean()) if n_known else None,
        "distractor_rate": float((composite_pred == distractor_attr).mean()),
        "solo_distractor_rate": float((object_pred == distractor_attr).mean()),
    }


def attribute_weights(backbone, probes: Probes, class_names: Sequence[str], templates, name_object: bool,
                      cache_dir) -> list[np.ndarray]:
    """(d, K) text weights per probe group: one matrix for attribute-only prompts, else one per object class."""
    from ..data.prompts import load_templates
    from ..features.text import class_weights

    if probes.attribute == "class":
        return [class_weights(backbone, class_names, templates, cache_dir=cache_dir)]
    colours = list(COLOURS)
    default = OBJECT_COLOUR_TEMPLATES if name_object else COLOUR_TEMPLATES
    chosen = load_templates(templates if templates is not None else list(default))
    if not name_object:
        return [class_weights(backbone, colours, chosen, cache_dir=cache_dir)]
    if any("{o}" not in t for t in chosen):
        raise CliplabError("templates naming the object need an {o} placeholder (and {c} for the colour)")
    return [class_weights(backbone, colours, [t.replace("{o}", name) for t in chosen], cache_dir=cache_dir)
            for name in class_names]


@register_analysis("cab", paper=25, command="cliplab analyse cab")
def measure_cab(backbone, dataset: ImageDataset, *, attribute: str = "class", size: float = 0.5, probes: int = 500,
                seed: int = 0, templates: str | list[str] | None = None, name_object: bool = False,
                cache_dir: str | Path | None = None, batch_size: int = 64, num_workers: int | None = None,
                progress: bool = True) -> dict:
    """Concept-association bias: how often a distractor's attribute wins on object+distractor composites.

    ``templates``: for class probes the class templates (required); for colour probes optional colour templates
    with ``{c}`` (and ``{o}`` for the object's class when ``name_object``). Returns the summary
    (:func:`cab_summary`), per distractor attribute the CAB rate, and the settings."""
    from ..features.embed import embed_images

    if not has_labels(dataset):
        raise DatasetError(f"{dataset.name}: no labelled images to build probes from")
    if attribute == "class" and templates is None:
        raise CliplabError("class probes need class templates")
    drawn = draw_probes(dataset.labels, probes, seed, attribute)
    names = list(dataset.class_names) if attribute == "class" else list(COLOURS)
    weights = attribute_weights(backbone, drawn, dataset.class_names, templates, name_object, cache_dir)

    def predict(size_: float) -> tuple[np.ndarray, np.ndarray, dict]:
        view = CompositeDataset(dataset, drawn, size_, names)
        features = embed_images(backbone, view, cache_dir, batch_size=batch_size, num_workers=num_workers,
                                progress=progress)
        rows = np.asarray(features.indices)
        x = np.asarray(features.features, dtype=np.float64)
        group = (dataset.labels[drawn.objects[rows]] if len(weights) > 1 else np.zeros(len(rows), dtype=np.int64))
        pred = np.array([int(np.argmax(x[k] @ weights[g])) for k, g in enumerate(group)], dtype=np.int64)
        return rows, pred, features.model

    solo_rows, solo_pred, model = predict(0.0)
    comp_rows, comp_pred, _ = predict(size)
    rows = np.intersect1d(solo_rows, comp_rows)  # probes whose images could all be read
    solo = solo_pred[np.searchsorted(solo_rows, rows)]
    comp = comp_pred[np.searchsorted(comp_rows, rows)]
    obj_attr, dis_attr = drawn.object_attr[rows], drawn.distractor_attr[rows]
    summary = cab_summary(solo, comp, obj_attr, dis_attr)
    known = solo == obj_attr
    per_distractor = {}
    for a, name in enumerate(names):
        chosen = known & (dis_attr == a)
        if chosen.any():
            per_distractor[name] = {"known": int(chosen.sum()), "cab": float((comp[chosen] == a).mean())}
    return {"summary": summary, "per_distractor": per_distractor, "attribute": attribute, "attributes": names,
            "size": float(size), "seed": int(seed), "dataset": dataset.name, "split": dataset.split,
            "templates": templates if templates is None or isinstance(templates, str) else list(templates),
            "name_object": bool(name_object), "model": model, "paper": 25, "skipped": int(len(drawn) - len(rows))}


def write_cab_results(result: dict, output_dir: str | Path) -> Path:
    """``cab_<attribute>_<dataset>_<split>_<model>_<hash>.json`` under ``output_dir`` (CLIP_benchmark's keys, the
    summary as metrics, everything else in the ``cliplab`` block)."""
    from ..eval.naming import run_stem
    from ..eval.results import results_record, write_json

    extra = {key: value for key, value in result.items() if key not in ("summary", "model", "dataset")}
    record = results_record(dataset=result["dataset"], model=result["model"], task="concept_association_bias",
                            metrics=result["summary"], extra=extra)
    stem = run_stem("cab", record, method=result["attribute"], dataset=result["dataset"], split=result["split"])
    return write_json(record, Path(output_dir) / f"{stem}.json")
