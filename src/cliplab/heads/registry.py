"""Head registry: methods register by name when their module is imported, as timm and open_clip register models.

``@register("ncm", family="fewshot", needs_train=True)`` on a head class is all a new method needs:
the registry imports every module in ``cliplab/heads/`` on first use, ``create_head`` builds it by name,
and the generic evaluation, the CLI and ``cliplab methods`` find it. ``describe_heads`` reads the same
facts from the modules' source without importing them (``cliplab methods`` starts without scikit-learn
or torch).

A registration declares what the method's fit uses and what the fitted head gives, so that no caller reads
signatures or attribute names (one provider, ``cliplab.eval.inputs``, builds the inputs from these):

- ``needs``: fit inputs beyond the labelled training features (``NEEDS``): "val" (the protocol's validation
  part as ``X_val``/``y_val``), "views" (augmented views (V, n, d) of the training items), "caption_features"
  (text embeddings of the training items' captions), "aux_features" (a second model's features appended
  column-wise, named by the ``aux_model`` parameter), "descriptions" (takes a description set), "llm" (takes a
  language model spec), "images" (reads images itself: a corpus or a dataset), "artefact" (a trained folder),
  "unlabelled" (the train split's rows outside the few-shot draw as ``unlabelled`` features with their labels
  removed, and with "images" their ``unlabelled_images``: pseudolabel methods).
- ``default_templates``: what ``templates=None`` means for the method everywhere: None = the method takes no
  templates; "dataset" = the dataset's CLIP_benchmark set, else "imagenet7" (also without a dataset); ``()`` =
  no templates (the head's own None, e.g. CuPL's sentences alone); else a template-set name or a tuple of
  templates, the head's own ``__init__`` default (a test checks they agree).
- ``gives``: what a fitted head offers beyond ``logits`` (``GIVES``): "class_weights" (``weights_`` (d, C) in
  the joint space, what MCM scores against), "sentences" (``sentences()``, the prompts per class: explainable),
  "backbone" (``backbone_``, a derived Backbone whose features the head scores: test images are embedded
  through it).
- ``fit_problems``: the keys of ``fit_summary()`` that list what the fit could not do (LLM failures, ...).
- ``per_image``: parameters that make one image's logits independent of the other images scored with it
  (applied by ``cliplab classify`` and the service; e.g. CapS-Adapter's ``scaling="fit"``).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path

from .._sources import decorated_classes, first_doc_line, literal_arguments
from ..errors import CliplabError

# heads/ modules that are not heads: shared code (base, the logistic solver), the registry, saving
NOT_HEADS = frozenset({"base", "logistic", "registry", "saving"})
FAMILIES = ("zeroshot", "fewshot", "ood", "encoder")
NEEDS = ("val", "views", "caption_features", "aux_features", "descriptions", "llm", "images", "artefact", "unlabelled")
GIVES = ("class_weights", "sentences", "backbone")
DATASET_TEMPLATES = "dataset"


@dataclass(frozen=True)
class HeadEntry:
    """A registered head class, its family, paper, and what it needs to be built and fitted."""

    name: str
    cls: type
    family: str
    paper: int | None
    summary: str
    needs_train: bool  # fit needs labelled training features
    needs_backbone: bool  # __init__ takes the Backbone (text encoder, or training through the encoders)
    needs: frozenset[str] = frozenset()
    default_templates: str | tuple[str, ...] | None = None
    gives: frozenset[str] = frozenset()
    fit_problems: tuple[str, ...] = ()
    per_image: dict = field(default_factory=dict)

    @property
    def takes_templates(self) -> bool:
        """Whether the method takes templates (declared by a ``default_templates``)."""
        return self.default_templates is not None

    def summarised(self) -> HeadSummary:
        """The entry without its class: what ``describe_heads`` reads from the source."""
        return HeadSummary(self.name, self.family, self.paper, self.summary, self.needs_train, self.needs_backbone,
                           self.needs, self.default_templates, self.gives, self.fit_problems, self.per_image)


@dataclass(frozen=True)
class HeadSummary:
    """What ``cliplab methods`` shows of a head: a ``HeadEntry`` without the class."""

    name: str
    family: str
    paper: int | None
    summary: str
    needs_train: bool
    needs_backbone: bool
    needs: frozenset[str] = frozenset()
    default_templates: str | tuple[str, ...] | None = None
    gives: frozenset[str] = frozenset()
    fit_problems: tuple[str, ...] = ()
    per_image: dict = field(default_factory=dict)


_REGISTRY: dict[str, HeadEntry] = {}
_LOADED = False


def register(name: str, family: str, paper: int | None = None, *, needs_train: bool = True,
             needs_backbone: bool | None = None, needs: tuple[str, ...] = (),
             default_templates: str | tuple[str, ...] | None = None, gives: tuple[str, ...] = (),
             fit_problems: tuple[str, ...] = (), per_image: dict | None = None):
    """Class decorator: ``@register("zeroshot", family="zeroshot", needs_train=False, default_templates="dataset")``.

    ``needs_backbone`` defaults to whether ``__init__`` takes a ``backbone`` argument; ``needs``,
    ``default_templates``, ``gives``, ``fit_problems`` and ``per_image`` as the module docstring says.
    """
    facts = _checked_facts(name, family, needs, default_templates, gives, fit_problems, per_image)

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls.__qualname__ != cls.__qualname__:
            raise CliplabError(f"head name {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        takes_backbone = "backbone" in inspect.signature(cls.__init__).parameters
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = HeadEntry(name, cls, family, paper, summary, needs_train,
                                    takes_backbone if needs_backbone is None else needs_backbone, **facts)
        cls._registered_name = name
        return cls

    return decorate


def _checked_facts(name, family, needs, default_templates, gives, fit_problems, per_image) -> dict:
    """The declared facts in their stored form, refusing words outside the vocabularies."""
    for label, values, known in (("family", (family,), FAMILIES), ("needs", needs, NEEDS), ("gives", gives, GIVES)):
        if isinstance(values, str):
            raise CliplabError(f"head {name!r}: {label} must be a tuple of names, not the string {values!r}")
        unknown = [v for v in values if v not in known]
        if unknown:
            raise CliplabError(f"head {name!r}: unknown {label} {unknown[0]!r}; known: {', '.join(known)}")
    if not (default_templates is None or isinstance(default_templates, str)
            or (isinstance(default_templates, tuple) and all(isinstance(t, str) for t in default_templates))):
        raise CliplabError(f"head {name!r}: default_templates must be None, a name or a tuple of templates")
    return {"needs": frozenset(needs), "default_templates": default_templates, "gives": frozenset(gives),
            "fit_problems": tuple(fit_problems), "per_image": dict(per_image or {})}


def load_all() -> None:
    """Import every module of ``cliplab.heads`` once, so that each registers its heads."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in NOT_HEADS and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _LOADED = True


def head_entry(name_or_head) -> HeadEntry:
    """The entry of a registered name, head class or head instance."""
    load_all()
    if isinstance(name_or_head, str):
        if name_or_head not in _REGISTRY:
            raise CliplabError(f"unknown method {name_or_head!r}; known: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY[name_or_head]
    cls = name_or_head if isinstance(name_or_head, type) else type(name_or_head)
    for entry in _REGISTRY.values():
        if entry.cls is cls:
            return entry
    raise CliplabError(f"{cls.__name__} is not a registered head")


def get_head(name: str) -> type:
    """The head class registered as ``name``."""
    return head_entry(name).cls


def list_heads(family: str | None = None) -> list[HeadEntry]:
    """Registered heads, optionally of one family, sorted by name."""
    load_all()
    return sorted((e for e in _REGISTRY.values() if family in (None, e.family)), key=lambda e: e.name)


def create_head(name: str, *, backbone=None, class_names=None, **params):
    """Build the head registered as ``name``; ``backbone`` and ``class_names`` go to heads that take them.

    Unknown parameters are an error naming the ones the head takes.
    """
    entry = head_entry(name)
    accepted = [p for p in inspect.signature(entry.cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise CliplabError(f"method {name!r} takes no parameter {unknown[0]!r}; it takes {', '.join(accepted)}")
    if entry.needs_backbone and backbone is None:
        raise CliplabError(f"method {name!r} needs a backbone (a loaded model)")
    given = {"backbone": backbone, "class_names": class_names}
    params.update({key: value for key, value in given.items() if key in accepted and value is not None})
    return entry.cls(**params)


def describe_heads(family: str | None = None) -> list[HeadSummary]:
    """``list_heads`` without importing the heads: the ``@register(...)`` facts read from their source.

    Once the heads are loaded, or where a module's registration cannot be read statically (arguments that
    are not literals, a class without its own ``__init__``, a file that is not plain source), this is
    ``list_heads``. Either way the summaries equal the registry's (a test compares them).
    """
    if not _LOADED:
        found = _scan_sources()
        if found is not None:
            return sorted((s for s in found if family in (None, s.family)), key=lambda s: s.name)
    return [e.summarised() for e in list_heads(family)]


def _scan_sources() -> list[HeadSummary] | None:
    """Every ``@register(...)`` class in the package's modules, or None where one cannot be read statically."""
    decorated = decorated_classes(Path(__file__).resolve().parent, NOT_HEADS, "register")
    if decorated is None:
        return None
    found = [_summary_of(cls, decorator) for cls, decorator, _ in decorated]
    return None if any(summary is None for summary in found) else found


def _summary_of(cls: ast.ClassDef, decorator: ast.expr) -> HeadSummary | None:
    """The registry's facts for one decorated class, as ``register`` would compute them; None if not literal."""
    params = literal_arguments(decorator, register)
    if params is None:
        return None
    needs_backbone = params["needs_backbone"]
    if needs_backbone is None:
        init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return None  # inherited __init__: only the class itself can tell
        spec = init.args
        names = [a.arg for a in [*spec.posonlyargs, *spec.args, spec.vararg, *spec.kwonlyargs, spec.kwarg] if a]
        needs_backbone = "backbone" in names
    try:
        facts = _checked_facts(*(params[k] for k in ("name", "family", "needs", "default_templates", "gives",
                                                     "fit_problems", "per_image")))
    except CliplabError:
        return None  # register would refuse it too: let the import say so
    return HeadSummary(params["name"], params["family"], params["paper"], first_doc_line(cls), params["needs_train"],
                       needs_backbone, **facts)


_REGISTER_CALL = re.compile(r"^@register\(.*?^class ", re.M | re.S)


def method_names(family: str | None = None, *, need: str | None = None, gives: str | None = None,
                 trained: bool | None = None) -> list[str]:
    """Registered method names, sorted, optionally of a family, declaring a need, giving something, or (``trained``)
    needing training data or not.

    Read from the ``@register(...)`` lines alone while the heads are not imported (a few milliseconds: what help
    texts are generated from); from the registry otherwise or where a line cannot be read. Either way the same
    names (a test compares them)."""
    rows = None if _LOADED else _scan_registrations()
    if rows is None:
        rows = [(e.name, e.family, e.needs, e.gives, e.needs_train) for e in list_heads()]
    return sorted(name for name, fam, needs, given, train in rows if family in (None, fam)
                  and need in (None, *needs) and gives in (None, *given) and trained in (None, train))


@functools.cache  # the files of an installed package do not change while it runs: help texts scan once
def _scan_registrations() -> list[tuple[str, str, frozenset, frozenset, bool]] | None:
    """(name, family, needs, gives, needs_train) of every ``@register(...)`` in the package, from its text only."""
    folder = Path(__file__).resolve().parent
    rows = []
    for module in pkgutil.iter_modules([str(folder)]):
        if module.name in NOT_HEADS or module.name.startswith("_"):
            continue
        try:
            text = (folder / f"{module.name}.py").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        for match in _REGISTER_CALL.finditer(text):
            try:
                call = ast.parse(match.group(0)[1:-len("class ")].strip(), mode="eval").body
            except SyntaxError:
                return None
            p = literal_arguments(call, register)
            if p is None:
                return None
            rows.append((p["name"], p["family"], frozenset(p["needs"]), frozenset(p["gives"]), p["needs_train"]))
    return rows
