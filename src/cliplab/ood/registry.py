"""OOD score registry: a score registers by name when its module is imported (as the heads do).

``@register_score("energy", paper="Liu et al. 2020", needs=("logits",))`` on an :class:`~cliplab.ood.base.OODScore`
subclass is all a new score needs: the registry imports every module of ``cliplab/ood/`` on first use,
``create_score`` builds it by name with its parameters (the keyword arguments of its ``__init__``), and
``cliplab ood``/``cliplab robustness`` run it on any head. ``describe_scores`` reads the same facts from the
modules' source without importing them (``cliplab methods`` starts without scipy or torch).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from .._sources import decorated_classes, first_doc_line, literal_arguments
from ..errors import CliplabError

NOT_SCORES = {"base", "registry", "metrics"}
#: What a score may declare it reads (``cliplab.ood.base`` says how each reaches it):
#: ``logits``       the head's (n, C) logits (any head: --method M or --head DIR);
#: ``features``     the (n, d) L2-normalised image features;
#: ``text_weights`` (d, C) class text weights of the ID classes (CLIP prompt ensembling of the templates);
#: ``patch_grids``  (n, P, d) L2-normalised patch tokens in the joint space (ViT image towers);
#: ``fit_data``     ID train and val features, for a score that fits something (never the ID test set);
#: ``artefact``     a folder (or loaded object) the score reads, e.g. a trained CLIPN;
#: ``head``         the evaluation's head itself (``context.head``), for a score that reads a method's own
#:                  prediction, e.g. OSLoPrompt's unknown prompt.
NEEDS = ("logits", "features", "text_weights", "patch_grids", "fit_data", "artefact", "head")


@dataclass(frozen=True)
class ScoreSummary:
    """What ``cliplab methods`` shows of a score: its name, paper, needs, parameters and summary."""

    name: str
    paper: str | int | None
    needs: tuple[str, ...]
    params: tuple[tuple[str, object], ...]  # (name, default) in ``__init__`` order
    summary: str


@dataclass(frozen=True)
class ScoreEntry:
    """A registered score class and its facts."""

    name: str
    cls: type
    paper: str | int | None
    needs: frozenset[str]
    params: tuple[tuple[str, object], ...]
    summary: str

    def summary_row(self) -> ScoreSummary:
        return ScoreSummary(self.name, self.paper, tuple(n for n in NEEDS if n in self.needs), self.params,
                            self.summary)


_REGISTRY: dict[str, ScoreEntry] = {}
_LOADED = False


def _check_needs(name: str, needs) -> frozenset[str]:
    needs = frozenset(needs)
    unknown = sorted(needs - set(NEEDS))
    if unknown:
        raise CliplabError(f"OOD score {name!r} declares unknown needs {unknown}; known: {', '.join(NEEDS)}")
    return needs


def _params_of(init) -> tuple[tuple[str, object], ...]:
    if init is object.__init__:
        return ()
    out = []
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            raise CliplabError(f"{init.__qualname__}: a score's parameters are keyword arguments with defaults")
        out.append((p.name, p.default))
    return tuple(out)


def register_score(name: str, *, paper: str | int | None = None, needs=("logits",)):
    """Class decorator: ``@register_score("mcm", paper="Ming et al. 2022", needs=("features", "text_weights"))``.

    ``needs`` is a subset of :data:`NEEDS`; the parameters are the keyword arguments of the class's ``__init__``.
    """

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].cls.__qualname__ != cls.__qualname__:
            raise CliplabError(f"OOD score {name!r} is already registered by {_REGISTRY[name].cls.__name__}")
        declared = _check_needs(name, needs)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else ""
        _REGISTRY[name] = ScoreEntry(name, cls, paper, declared, _params_of(cls.__init__), summary)
        cls.name = name
        cls.needs = declared
        return cls

    return decorate


def load_all() -> None:
    """Import every module of ``cliplab.ood`` once, so that each registers its scores."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in NOT_SCORES and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    _LOADED = True


def score_entry(name: str) -> ScoreEntry:
    """The entry of a registered score name."""
    load_all()
    if name not in _REGISTRY:
        raise CliplabError(f"unknown OOD score {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_scores() -> list[ScoreEntry]:
    """Registered scores, sorted by name."""
    load_all()
    return sorted(_REGISTRY.values(), key=lambda e: e.name)


def create_score(name: str, **params):
    """Build the score registered as ``name``; an unknown parameter is an error naming the ones it takes."""
    entry = score_entry(name)
    accepted = [key for key, _ in entry.params]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise CliplabError(f"OOD score {name!r} takes no parameter {unknown[0]!r}; {takes}")
    return entry.cls(**params)


def describe_scores() -> list[ScoreSummary]:
    """``list_scores`` without importing the scores: the ``@register_score(...)`` facts read from their source.

    Once the scores are loaded, or where a registration cannot be read statically, this is ``list_scores``;
    either way the summaries equal the registry's (a test compares them).
    """
    if not _LOADED:
        found = _scan_sources()
        if found is not None:
            return sorted(found, key=lambda s: s.name)
    return [e.summary_row() for e in list_scores()]


def _scan_sources() -> list[ScoreSummary] | None:
    """Every ``@register_score(...)`` class in the package's modules, or None where one cannot be read statically."""
    decorated = decorated_classes(Path(__file__).resolve().parent, NOT_SCORES, "register_score")
    if decorated is None:
        return None
    found = [_summary_of(cls, decorator, classes) for cls, decorator, classes in decorated]
    return None if any(summary is None for summary in found) else found


def _init_params(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> tuple[tuple[str, object], ...] | None:
    """``register_score``'s parameters of ``cls``: its ``__init__``'s, else those of a base class defined in the
    same module (``OODScore`` has none); None where that cannot be read statically."""
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name)]
        if len(bases) != len(cls.bases) or len(bases) != 1:
            return None
        if bases[0] == "OODScore":
            return ()
        return _init_params(classes[bases[0]], classes) if bases[0] in classes else None
    spec = init.args
    if spec.vararg or spec.kwarg or spec.posonlyargs:
        return None
    positional = spec.args[1:]
    if len(spec.defaults) != len(positional) or any(d is None for d in spec.kw_defaults):
        return None
    try:
        values = [ast.literal_eval(d) for d in spec.defaults] + [ast.literal_eval(d) for d in spec.kw_defaults]
    except ValueError:
        return None
    return tuple(zip([a.arg for a in positional] + [a.arg for a in spec.kwonlyargs], values, strict=True))


def _summary_of(cls: ast.ClassDef, decorator: ast.expr, classes: dict[str, ast.ClassDef]) -> ScoreSummary | None:
    """The registry's facts for one decorated class, as ``register_score`` computes them; None if not literal."""
    arguments = literal_arguments(decorator, register_score)
    if arguments is None:
        return None
    params = _init_params(cls, classes)
    if params is None:
        return None
    needs = _check_needs(arguments["name"], arguments["needs"])
    return ScoreSummary(arguments["name"], arguments["paper"], tuple(n for n in NEEDS if n in needs), params,
                        first_doc_line(cls))
